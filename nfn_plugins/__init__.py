"""nfn-plugins: equivariant neural functionals for transformer weights (Transformer-NFN) as training tools."""

from .extract import bind, extract_weights, load_weights
from .families import Family, register_family, supported_families
from .group import GroupElement, SymmetryGroup
from .spec import BLOCK_AXES, TensorSpec, WeightSpaceSpec
from .weight_space import WeightSpace

__all__ = [
    "BLOCK_AXES",
    "Family",
    "GroupElement",
    "SymmetryGroup",
    "TensorSpec",
    "WeightSpace",
    "WeightSpaceSpec",
    "bind",
    "extract_weights",
    "load_weights",
    "register_family",
    "supported_families",
]
__version__ = "0.1.0"
