"""Transformer zoos: the paper's zoo model, small HF models, fast batched zoo building, loading.

Importing this package registers the ``zoo`` family (`PaperTransformer`) with `nfn_plugins.extract_weights`.
"""

from ..families import register_family
from .family import ZOO_FAMILY, extract_zoo_weights, load_zoo_weights
from .models import (
    HFClassifier,
    PaperConfig,
    PaperTransformer,
    arch_key,
    build_model,
    init_weights,
    make_bert,
    make_vit,
    paper_arch,
    sinusoidal_positions,
    unwrap,
)

register_family(ZOO_FAMILY)

from .build import (  # noqa: E402  (after the family is registered)
    OPTIMIZERS,
    HyperGrid,
    Zoo,
    ZooConfig,
    ZooError,
    build_zoo,
    load_zoo,
)

__all__ = [
    "OPTIMIZERS",
    "ZOO_FAMILY",
    "HFClassifier",
    "HyperGrid",
    "PaperConfig",
    "PaperTransformer",
    "Zoo",
    "ZooConfig",
    "ZooError",
    "arch_key",
    "build_model",
    "build_zoo",
    "extract_zoo_weights",
    "load_zoo_weights",
    "init_weights",
    "load_zoo",
    "make_bert",
    "make_vit",
    "paper_arch",
    "sinusoidal_positions",
    "unwrap",
]
