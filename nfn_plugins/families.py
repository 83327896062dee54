"""Architecture families: where each canonical tensor lives in a model, and the facts that fix its group.

A family is data: per-block parameter rules (relative path -> canonical tensors), rules for the parts
outside the blocks (name pattern -> axes), and a function reading dimensions from the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .spec import Axis, MlpScale

S = "stream"
G = "stream_gain"


@dataclass(frozen=True)
class BlockRule:
    """One block parameter: ``layout`` says how it is stored, ``parts`` which canonical tensors it holds.

    layout: "linear" (weight stored [out, in]), "conv1d" (stored [in, out], GPT-2), "in_proj" (torch
    MultiheadAttention's fused [3D, D] rows), "vector" (biases and norm parameters).
    """

    path: str
    layout: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class OuterRule:
    """A parameter outside the blocks, matched by a regex on its clean name; stored layout is kept."""

    pattern: str
    axes: tuple[Axis, ...]
    role: str


@dataclass(frozen=True)
class Dims:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_act: str
    gated: bool
    rotary: bool
    rms_norm: bool


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    block_list: str  # regex the dotted path of the blocks' ModuleList must match (full match)
    block_rules: tuple[BlockRule, ...]
    outer_rules: tuple[OuterRule, ...]
    dims: Callable[[nn.Module, nn.Module], Dims]  # (root model, first block) -> Dims

    def block_rule_paths(self) -> list[str]:
        return [r.path for r in self.block_rules]


def _linear(path: str, weight: str, bias: str | None = None) -> tuple[BlockRule, ...]:
    rules = [BlockRule(f"{path}.weight", "linear", (weight,))]
    if bias:
        rules.append(BlockRule(f"{path}.bias", "vector", (bias,)))
    return tuple(rules)


def _norm(path: str, i: int, bias: bool = True) -> tuple[BlockRule, ...]:
    rules = [BlockRule(f"{path}.weight", "vector", (f"norm{i}_weight",))]
    if bias:
        rules.append(BlockRule(f"{path}.bias", "vector", (f"norm{i}_bias",)))
    return tuple(rules)


def _act_name(act) -> str:
    if isinstance(act, str):
        return act.lower()
    name = getattr(act, "__name__", None) or type(act).__name__
    return name.lower()


def mlp_scale(act: str, gated: bool) -> MlpScale:
    """Per-unit scalings the MLP admits: gated -> any non-zero scale on the (linear) up projection,
    ReLU -> positive scales (ReLU is positively homogeneous), anything else -> none."""
    if gated:
        return "nonzero"
    return "positive" if act in ("relu", "relu()") else "none"


def _hf_dims(model: nn.Module, block: nn.Module, gated: bool = False, rotary: bool = False, rms: bool = False) -> Dims:
    cfg = model.config
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or d // n_heads
    act = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", "gelu")
    if rotary and getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{type(model).__name__}: partial rotary embeddings are not supported")
    return Dims(n_heads, n_kv, head_dim, _act_name(act), gated, rotary, rms)


def _torch_dims(model: nn.Module, block: nn.Module) -> Dims:
    attn = block.self_attn
    if not attn._qkv_same_embed_dim:
        raise ValueError("nn.MultiheadAttention with kdim/vdim different from embed_dim is not supported")
    return Dims(attn.num_heads, attn.num_heads, attn.head_dim, _act_name(block.activation), False, False, False)


BERT = Family(
    name="bert",
    description="BERT-style post-LN encoders (BertModel, RobertaModel, ElectraModel, MiniLM ...)",
    block_list=r"(.*\.)?encoder\.layer",
    block_rules=(
        *_linear("attention.self.query", "q", "q_bias"),
        *_linear("attention.self.key", "k", "k_bias"),
        *_linear("attention.self.value", "v", "v_bias"),
        *_linear("attention.output.dense", "o", "o_bias"),
        *_norm("attention.output.LayerNorm", 1),
        *_linear("intermediate.dense", "up", "up_bias"),
        *_linear("output.dense", "down", "down_bias"),
        *_norm("output.LayerNorm", 2),
    ),
    outer_rules=(
        OuterRule(r"(.*\.)?embeddings\.(word|position|token_type)_embeddings\.weight", (None, S), "embed"),
        OuterRule(r"(.*\.)?embeddings\.LayerNorm\.weight", (G,), "vector"),
        OuterRule(r"(.*\.)?embeddings\.LayerNorm\.bias", (S,), "vector"),
        OuterRule(r"(.*\.)?pooler\.dense\.weight", (None, S), "readout"),
        OuterRule(r"(.*\.)?pooler\.dense\.bias", (None,), "free"),
        OuterRule(r"classifier\.dense\.weight", (None, S), "readout"),  # RoBERTa head reads the stream
        OuterRule(r"classifier\.(dense\.bias|out_proj\.weight|out_proj\.bias)", None, "free"),
        OuterRule(r"classifier\.(weight|bias)", None, "free"),  # BERT head reads the pooler
    ),
    dims=lambda m, b: _hf_dims(m, b),
)

VIT = Family(
    name="vit",
    description="ViT / DeiT pre-LN image encoders",
    block_list=r"(.*\.)?(layers|encoder\.layer)",
    block_rules=(
        *_linear("attention.q_proj", "q", "q_bias"),
        *_linear("attention.k_proj", "k", "k_bias"),
        *_linear("attention.v_proj", "v", "v_bias"),
        *_linear("attention.o_proj", "o", "o_bias"),
        *_norm("layernorm_before", 1),
        *_linear("mlp.fc1", "up", "up_bias"),
        *_linear("mlp.fc2", "down", "down_bias"),
        *_norm("layernorm_after", 2),
    ),
    outer_rules=(
        OuterRule(r"(.*\.)?embeddings\.(cls_token|distillation_token|position_embeddings)", (None, None, S), "embed"),
        OuterRule(r"(.*\.)?embeddings\.mask_token", (None, None, S), "embed"),
        OuterRule(r"(.*\.)?patch_embeddings\.projection\.weight", (S, None, None, None), "embed"),
        OuterRule(r"(.*\.)?patch_embeddings\.projection\.bias", (S,), "vector"),
        OuterRule(r"(.*\.)?layernorm\.weight", (G,), "vector"),
        OuterRule(r"(.*\.)?layernorm\.bias", (S,), "vector"),
        OuterRule(r"(.*\.)?pooler\.dense\.weight", (None, S), "readout"),
        OuterRule(r"(.*\.)?pooler\.dense\.bias", (None,), "free"),
        OuterRule(r"classifier\.weight", (None, S), "readout"),
        OuterRule(r"classifier\.bias", (None,), "free"),
    ),
    dims=lambda m, b: _hf_dims(m, b),
)

GPT2 = Family(
    name="gpt2",
    description="GPT-2 pre-LN decoders (fused Conv1D c_attn, weights stored (in, out))",
    block_list=r"(.*\.)?h",
    block_rules=(
        BlockRule("attn.c_attn.weight", "conv1d", ("q", "k", "v")),
        BlockRule("attn.c_attn.bias", "vector", ("q_bias", "k_bias", "v_bias")),
        BlockRule("attn.c_proj.weight", "conv1d", ("o",)),
        BlockRule("attn.c_proj.bias", "vector", ("o_bias",)),
        *_norm("ln_1", 1),
        BlockRule("mlp.c_fc.weight", "conv1d", ("up",)),
        BlockRule("mlp.c_fc.bias", "vector", ("up_bias",)),
        BlockRule("mlp.c_proj.weight", "conv1d", ("down",)),
        BlockRule("mlp.c_proj.bias", "vector", ("down_bias",)),
        *_norm("ln_2", 2),
    ),
    outer_rules=(
        OuterRule(r"(.*\.)?(wte|wpe)\.weight", (None, S), "embed"),
        OuterRule(r"(.*\.)?ln_f\.weight", (G,), "vector"),
        OuterRule(r"(.*\.)?ln_f\.bias", (S,), "vector"),
        OuterRule(r"(lm_head|score)\.weight", (None, S), "readout"),
        OuterRule(r"score\.bias", (None,), "free"),
    ),
    dims=lambda m, b: _hf_dims(m, b),
)

LLAMA = Family(
    name="llama",
    description="Llama-style decoders: rotary positions, grouped-query attention, gated MLP, RMSNorm (Llama, Qwen2, Mistral, SmolLM2)",
    block_list=r"(.*\.)?layers",
    block_rules=(
        *_linear("self_attn.q_proj", "q", "q_bias"),
        *_linear("self_attn.k_proj", "k", "k_bias"),
        *_linear("self_attn.v_proj", "v", "v_bias"),
        *_linear("self_attn.o_proj", "o", "o_bias"),
        *_norm("input_layernorm", 1, bias=False),
        *_linear("mlp.gate_proj", "gate", "gate_bias"),
        *_linear("mlp.up_proj", "up", "up_bias"),
        *_linear("mlp.down_proj", "down", "down_bias"),
        *_norm("post_attention_layernorm", 2, bias=False),
    ),
    outer_rules=(
        OuterRule(r"(.*\.)?embed_tokens\.weight", (None, S), "embed"),
        OuterRule(r"(.*\.)?norm\.weight", (G,), "vector"),
        OuterRule(r"(lm_head|score)\.weight", (None, S), "readout"),
        OuterRule(r"score\.bias", (None,), "free"),
    ),
    dims=lambda m, b: _hf_dims(m, b, gated=True, rotary=True, rms=True),
)

TORCH = Family(
    name="torch",
    description="torch nn.TransformerEncoder / stacks of nn.TransformerEncoderLayer",
    block_list=r"(.*\.)?layers",
    block_rules=(
        BlockRule("self_attn.in_proj_weight", "in_proj", ("q", "k", "v")),
        BlockRule("self_attn.in_proj_bias", "vector", ("q_bias", "k_bias", "v_bias")),
        *_linear("self_attn.out_proj", "o", "o_bias"),
        *_linear("linear1", "up", "up_bias"),
        *_linear("linear2", "down", "down_bias"),
        *_norm("norm1", 1),
        *_norm("norm2", 2),
    ),
    outer_rules=(
        OuterRule(r"(.*\.)?norm\.weight", (G,), "vector"),
        OuterRule(r"(.*\.)?norm\.bias", (S,), "vector"),
    ),
    dims=_torch_dims,
)

FAMILIES: tuple[Family, ...] = (BERT, VIT, GPT2, LLAMA, TORCH)


def register_family(family: Family) -> None:
    """Add a family (tried before the built-in ones), e.g. the project's zoo models."""
    global FAMILIES
    FAMILIES = (family, *tuple(f for f in FAMILIES if f.name != family.name))


def supported_families() -> str:
    return "; ".join(f"{f.name}: {f.description}" for f in FAMILIES)


def match_outer(family: Family, name: str) -> OuterRule | None:
    for rule in family.outer_rules:
        if re.fullmatch(rule.pattern, name):
            return rule
    return None
