"""Transformer-NFN layers and models."""

from .layers import EquivariantLayer, EquivariantReLU, InvariantLayer
from .model import TransformerNFN, TransformerNFNEncoder

__all__ = ["EquivariantLayer", "EquivariantReLU", "InvariantLayer", "TransformerNFN", "TransformerNFNEncoder"]
