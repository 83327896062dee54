"""The ``zoo`` architecture family: how `PaperTransformer` maps onto the canonical weight space.

Registered with `nfn_plugins.register_family` when ``nfn_plugins.zoo`` is imported, after which
``nfn_plugins.extract_weights(PaperTransformer(...))`` works like for any built-in family.

Symmetry note: the paper's zoo blocks have no residual connections and parameter-free LayerNorms, so
the stream axis of every block could be permuted on its own (the paper's per-block P_O), and the
patch/token embedding, each block and the classifier would each carry an independent permutation. The
core implements the smaller group of one stream permutation shared by the whole model (the residual
stream group). That group is a subgroup of the real one and still an exact symmetry here: the
sinusoidal position table is a (frozen) parameter with a stream axis, so it is permuted along with the
embedding. NFNs built on the shared-stream group are therefore correct for this family, only less
constrained than they could be.
"""

from __future__ import annotations

from torch import nn

from ..extract import Binding, bind
from ..families import BlockRule, Dims, Family, OuterRule
from ..weight_space import WeightSpace

S = "stream"


def _dims(model: nn.Module, block: nn.Module) -> Dims:
    attn = block.attn
    return Dims(
        n_heads=attn.n_heads,
        n_kv_heads=attn.n_heads,
        head_dim=attn.head_dim,
        mlp_act="relu",
        gated=False,
        rotary=False,
        rms_norm=False,
    )


ZOO_FAMILY = Family(
    name="zoo",
    description="the paper's Small Transformer Zoo model (nfn_plugins.zoo.PaperTransformer): residual-free pre-LN",
    block_list=r"blocks",
    block_rules=(
        BlockRule("attn.q.weight", "linear", ("q",)),
        BlockRule("attn.k.weight", "linear", ("k",)),
        BlockRule("attn.v.weight", "linear", ("v",)),
        BlockRule("attn.o.weight", "linear", ("o",)),
        BlockRule("mlp.up.weight", "linear", ("up",)),
        BlockRule("mlp.up.bias", "vector", ("up_bias",)),
        BlockRule("mlp.down.weight", "linear", ("down",)),
        BlockRule("mlp.down.bias", "vector", ("down_bias",)),
    ),
    outer_rules=(
        OuterRule(r"patch_embed\.weight", (S, None), "embed"),
        OuterRule(r"patch_embed\.bias", (S,), "vector"),
        OuterRule(r"token_embed\.weight", (None, S), "embed"),
        OuterRule(r"pos_embed", (None, S), "embed"),
        OuterRule(r"classifier\.0\.weight", (None, S), "readout"),
        OuterRule(r"classifier\.(0\.bias|2\.weight|2\.bias)", None, "free"),
    ),
    dims=_dims,
)


def zoo_binding(model: nn.Module) -> Binding:
    """The core's `bind` for a zoo model (`PaperTransformer`, or the HF model inside an `HFClassifier`)."""
    from .models import unwrap

    return bind(unwrap(model))


def extract_zoo_weights(model: nn.Module) -> WeightSpace:
    """``nfn_plugins.extract_weights`` for zoo models (also unwraps `HFClassifier`)."""
    return zoo_binding(model).read()


def load_zoo_weights(model: nn.Module, ws: WeightSpace) -> None:
    """``nfn_plugins.load_weights`` for zoo models."""
    zoo_binding(model).write(ws)
