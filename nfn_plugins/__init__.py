"""nfn-plugins: equivariant neural functionals for transformer weights (Transformer-NFN) as training tools."""

from .extract import bind, extract_weights, load_weights
from .families import FAMILIES, Family, register_family
from .group import GroupElement, SymmetryGroup
from .spec import BLOCK_AXES, TensorSpec, WeightSpaceSpec
from .weight_space import WeightSpace

__all__ = [
    "BLOCK_AXES",
    "FAMILIES",
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
]
__version__ = "0.1.0"
