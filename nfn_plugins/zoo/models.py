"""Zoo architectures: the paper's Small Transformer Zoo model and small Hugging Face models.

`PaperTransformer` is the Transformer-NFN paper's zoo model (see ``shared/reference/transformer-nfn.md``):
width 32, 2 heads, ReLU MLP of width 64, 2 blocks, pre-LN without affine parameters and WITHOUT residual
connections, mean pooling and a 32 -> 32 -> classes classifier. Images enter as 4x4 patches (49 tokens for
MNIST) through a linear patch embedding; text enters through a token embedding. The embedding is scaled
by sqrt(D) (as in "Attention is all you need"; ``PaperConfig.embed_scale``) and fixed sinusoidal
positions are added. Attention heads have no biases. (Without the sqrt(D) scale, members initialised
with a small std mostly see the positions after the first LayerNorm and rarely learn in a short budget.)

The HF family (`make_vit`, `make_bert`) are stock ``ViTForImageClassification`` and
``BertForSequenceClassification`` built from configs only (no hub access), with residuals and LayerNorm.

All models are built by `build_model` from a plain JSON-able ``arch`` dict, so a zoo's metadata can
rebuild any member.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

PAPER = "paper"
VIT = "vit"
BERT = "bert"
MODEL_FAMILIES = (PAPER, VIT, BERT)


def sinusoidal_positions(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention is all you need": ``[n_positions, dim]``."""
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.float()


@dataclass(frozen=True)
class PaperConfig:
    """Shape of a `PaperTransformer`. Defaults are the paper's (MNIST); ``modality="text"`` for text."""

    modality: str = "image"  # "image" (patches) or "text" (token ids, 0 = padding)
    n_classes: int = 10
    d_model: int = 32
    n_heads: int = 2
    mlp_width: int = 64
    n_blocks: int = 2
    classifier_width: int = 32
    image_size: int = 28
    patch_size: int = 4
    channels: int = 1
    vocab_size: int = 2000
    max_len: int = 48
    # multiplier of the patch / token embedding before the positions are added; None = sqrt(d_model) as in
    # "Attention is all you need" (keeps the content on the scale of the unit-size sinusoidal positions)
    embed_scale: float | None = None

    def __post_init__(self) -> None:
        if self.modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {self.modality!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.modality == "image" and self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")

    @property
    def scale(self) -> float:
        return math.sqrt(self.d_model) if self.embed_scale is None else float(self.embed_scale)

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.modality == "image" else self.max_len


def _dropout(x: torch.Tensor, p: torch.Tensor, training: bool) -> torch.Tensor:
    """Dropout with a tensor rate, so that members batched under ``vmap`` can each have their own rate."""
    if not training:
        return x
    keep = (torch.rand_like(x) >= p).to(x.dtype)
    return x * keep / (1 - p)


class PaperAttention(nn.Module):
    """Multi-head self-attention, per-head Q/K/V/O without biases (stored as ``nn.Linear`` [out, in])."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, d = self.n_heads, self.head_dim
        q = self.q(x).view(b, t, h, d).transpose(1, 2)
        k = self.k(x).view(b, t, h, d).transpose(1, 2)
        v = self.v(x).view(b, t, h, d).transpose(1, 2)
        scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-1, -2)
        if key_mask is not None:  # [b, t] True where a token is real
            scores = scores.masked_fill(~key_mask[:, None, None, :], -1e9)
        out = scores.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, t, h * d))


class PaperMLP(nn.Module):
    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.up = nn.Linear(d_model, width)
        self.down = nn.Linear(width, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)))


class PaperBlock(nn.Module):
    """``x -> MLP(LN(Attn(LN(x))))``: pre-LN without affine parameters and no residual connections."""

    def __init__(self, cfg: PaperConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, elementwise_affine=False)
        self.attn = PaperAttention(cfg.d_model, cfg.n_heads)
        self.norm2 = nn.LayerNorm(cfg.d_model, elementwise_affine=False)
        self.mlp = PaperMLP(cfg.d_model, cfg.mlp_width)

    def forward(self, x: torch.Tensor, p: torch.Tensor, key_mask: torch.Tensor | None, drop: bool) -> torch.Tensor:
        x = self.attn(self.norm1(x), key_mask)
        x = _dropout(x, p, drop)
        return _dropout(self.mlp(self.norm2(x)), p, drop)


class PaperTransformer(nn.Module):
    """The Small Transformer Zoo model of the Transformer-NFN paper, for images (patches) or text (tokens).

    Parameters: ``patch_embed`` (Linear, image) or ``token_embed`` (Embedding, text); ``pos_embed``, the
    fixed sinusoidal table, kept as a frozen parameter so that it is part of the weight space (the
    stream permutation acts on it; it never trains); ``blocks.i.attn.{q,k,v,o}``, ``blocks.i.mlp.{up,down}``;
    ``classifier.{0,2}``. The dropout rate is the buffer ``dropout_p`` (a tensor, so batched members can
    differ). Text inputs are int64 ids with 0 = padding: padded keys are masked and pooling averages the
    real tokens only.

    Symmetries: with no residuals, each block's stream axis (between the input, attention output and MLP
    output) could be permuted independently; the core's group (`nfn_plugins.SymmetryGroup`) uses one
    permutation of the stream shared by all blocks, which is a subgroup of that larger group and still an
    exact symmetry of this model (see `ZOO_FAMILY`).
    """

    def __init__(self, cfg: PaperConfig | None = None, dropout: float = 0.0, **kwargs):
        super().__init__()
        cfg = cfg or PaperConfig(**kwargs)
        self.config = cfg
        if cfg.modality == "image":
            self.patch_embed = nn.Linear(cfg.channels * cfg.patch_size**2, cfg.d_model)
        else:
            self.token_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Parameter(sinusoidal_positions(cfg.n_tokens, cfg.d_model), requires_grad=False)
        self.blocks = nn.ModuleList(PaperBlock(cfg) for _ in range(cfg.n_blocks))
        self.classifier = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.classifier_width), nn.ReLU(), nn.Linear(cfg.classifier_width, cfg.n_classes)
        )
        self.register_buffer("dropout_p", torch.tensor(float(dropout)))
        # Python-side switch: batched training turns dropout off for a batch whose members all have rate 0
        self.dropout_active = dropout > 0

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, n_patches, C * p * p]``, patches in row-major order."""
        c, p = self.config.channels, self.config.patch_size
        b, _, hgt, wid = images.shape
        x = images.reshape(b, c, hgt // p, p, wid // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (hgt // p) * (wid // p), c * p * p)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits. Images ``[B, C, H, W]`` (or already cut into patches, ``[B, n_patches, C*p*p]``, see
        `prepare_inputs`); text ``[B, T]`` int64 ids with 0 = padding."""
        key_mask = None
        if self.config.modality == "image":
            x = self.patch_embed(inputs if inputs.dim() == 3 else self.patches(inputs))
        else:
            key_mask = inputs != 0
            x = self.token_embed(inputs)
        x = x * self.config.scale + self.pos_embed[: x.shape[1]]
        drop = self.training and self.dropout_active
        for block in self.blocks:
            x = block(x, self.dropout_p, key_mask, drop)
        if key_mask is None:
            pooled = x.mean(1)
        else:
            m = key_mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp_min(1)
        return self.classifier(pooled)


# ---------------------------------------------------------------------------------------------------
# Hugging Face family
# ---------------------------------------------------------------------------------------------------
def make_vit(
    d_model: int = 32,
    n_heads: int = 2,
    n_blocks: int = 2,
    mlp_ratio: int = 2,
    patch_size: int = 7,
    image_size: int = 28,
    channels: int = 1,
    n_classes: int = 10,
    dropout: float = 0.0,
) -> nn.Module:
    """A small ``ViTForImageClassification`` (pre-LN, residuals) from a config only."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=channels,
        hidden_size=d_model,
        num_hidden_layers=n_blocks,
        num_attention_heads=n_heads,
        intermediate_size=mlp_ratio * d_model,
        num_labels=n_classes,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
        hidden_act="gelu",
    )
    cfg._attn_implementation = "eager"
    return ViTForImageClassification(cfg)


def make_bert(
    vocab_size: int = 2000,
    max_len: int = 48,
    d_model: int = 32,
    n_heads: int = 2,
    n_blocks: int = 2,
    mlp_ratio: int = 2,
    n_classes: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """A small ``BertForSequenceClassification`` (post-LN, residuals) with its own vocabulary, from a config."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=n_blocks,
        num_attention_heads=n_heads,
        intermediate_size=mlp_ratio * d_model,
        max_position_embeddings=max_len,
        type_vocab_size=1,
        num_labels=n_classes,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=dropout,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    return BertForSequenceClassification(cfg)


class HFClassifier(nn.Module):
    """Wraps an HF classifier so ``model(inputs) -> logits`` like `PaperTransformer` (text: 0 = padding)."""

    def __init__(self, model: nn.Module, text: bool):
        super().__init__()
        self.model = model
        self.text = text

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.text:
            # an additive 4D mask is used as given (HF's 2D-mask preparation branches on the mask's values,
            # which vmap cannot trace)
            pad = (inputs == 0)[:, None, None, :].to(torch.float32)
            mask = pad * torch.finfo(torch.float32).min
            return self.model(input_ids=inputs, attention_mask=mask).logits
        return self.model(pixel_values=inputs).logits


def build_model(arch: dict, dropout: float = 0.0) -> nn.Module:
    """A fresh model from a JSON-able ``arch`` dict: ``{"family": "paper"|"vit"|"bert", ...shape kwargs}``.

    Paper family: the `PaperConfig` fields. ViT: `make_vit` kwargs. BERT: `make_bert` kwargs. Every model
    maps a batch of inputs to logits. HF models are wrapped in `HFClassifier`; extract their weights from
    ``model.model`` (`unwrap`).
    """
    arch = dict(arch)
    family = arch.pop("family", None)
    if family == PAPER:
        return PaperTransformer(PaperConfig(**arch), dropout=dropout)
    if family == VIT:
        return HFClassifier(make_vit(**arch, dropout=dropout), text=False)
    if family == BERT:
        return HFClassifier(make_bert(**arch, dropout=dropout), text=True)
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(MODEL_FAMILIES)}")


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose weights form the weight space (the HF model inside `HFClassifier`)."""
    return model.model if isinstance(model, HFClassifier) else model


def paper_arch(modality: str = "image", **kwargs) -> dict:
    """The ``arch`` dict of a `PaperTransformer` (defaults filled in)."""
    return {"family": PAPER, **asdict(PaperConfig(modality=modality, **kwargs))}


def arch_key(arch: dict) -> str:
    """A short stable name of an architecture, e.g. ``paper-image-D32-H2-L2`` or ``vit-D48-H4-L3-P7``."""
    fam = arch["family"]
    d, h, layers = arch.get("d_model", 32), arch.get("n_heads", 2), arch.get("n_blocks", 2)
    if fam == PAPER:
        return f"paper-{arch.get('modality', 'image')}-D{d}-H{h}-L{layers}-A{arch.get('mlp_width', 64)}"
    if fam == VIT:
        return f"vit-D{d}-H{h}-L{layers}-R{arch.get('mlp_ratio', 2)}-P{arch.get('patch_size', 7)}"
    return f"bert-D{d}-H{h}-L{layers}-R{arch.get('mlp_ratio', 2)}"


@torch.no_grad()
def init_weights(model: nn.Module, std: float, generator: torch.Generator) -> None:
    """The zoo's initialisation: every trainable matrix / embedding ~ N(0, std^2), biases 0, norm gains 1.

    Frozen parameters (the sinusoidal positions) are left alone. Deterministic given ``generator``.
    """
    norm_types = (nn.LayerNorm,)
    gains = {id(m.weight) for m in model.modules() if isinstance(m, norm_types) and m.weight is not None}
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        if id(p) in gains:
            p.fill_(1.0)
        elif p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
        else:
            p.zero_()


def prepare_inputs(arch: dict, x: torch.Tensor) -> torch.Tensor:
    """Inputs in the form the model computes on fastest: paper-family images are cut into patches once
    (the model accepts both forms); everything else is returned unchanged."""
    if arch.get("family") == PAPER and arch.get("modality", "image") == "image" and x.dim() == 4:
        p = arch.get("patch_size", 4)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p).contiguous()
    return x


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the dropout rate of a built model (the `PaperTransformer` buffer or every ``nn.Dropout``)."""
    if isinstance(model, PaperTransformer):
        model.dropout_p.fill_(p)
        model.dropout_active = p > 0
        return
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
