"""`PaperTransformerNFN`: a re-implementation of the layer scheme of the Transformer-NFN paper.

Why this exists: it is the baseline our own Transformer-NFN is benchmarked against. It follows the
paper (Tran et al., "Equivariant Neural Functional Networks for Transformers", ICLR 2025) and the
structure of its official code, written from their description for our canonical weight space:

* GL(d_k) / GL(d_v) invariance per head comes from using only the per-head products
  ``W_q W_k^T`` and ``W_v W_o`` (each D x D), summed over heads, whenever information crosses tensors.
* The D axis is split as in the paper's zoo (no residual connections). The *input* D axis of a block
  (rows of W_q, W_k, W_v; columns of W_B and b_B) is treated as fixed: terms carry learned,
  width-specific tensors over it ([C_out, C_in, D, D] for a mix, [C_out, C_in, D, D, D] where a
  D x D product is mapped to a D vector). The *middle* D axis (columns of W_o, rows of W_A), which the
  paper permutes with P_O, is handled with DeepSets-style means and identity terms only.
* Equivariant layer outputs: W_q, W_k, W_v get a learned left mix over their D rows; W_o gets an
  identity term plus a mean over its D columns (so it stays P_O-equivariant); W_A, b_A, W_B, b_B
  combine QK/VO products, DeepSets sums over the MLP units and identity terms (quadratic in the
  weights). The terms ``QK -> W_B`` and ``QK -> b_B`` carry [C_out, C_in, D, D, D] tensors, which
  makes the parameter count grow as D^3 (our count: 17.46M at D=32 for 2 equivariant layers, 10
  channels, 2 blocks; the paper reports 17.5M).
* ReLU only on the W_A, b_A, W_B, b_B features (a pointwise ReLU on Q/K/V/O would break GL).
* Invariant layer: seven summed terms per block, a per-block LayerNorm, concatenation over blocks and
  an MLP head (sigmoid output by default, as the paper regresses accuracy in [0, 1] with BCE).

Symmetries of this model (tested in tests/test_baselines.py): invariant to per-block head
permutations, per-head GL maps of Q/K and V/O, per-block MLP unit permutations, and a per-block
permutation P_O of the middle D axis (W_o columns with W_A rows). It is NOT invariant to our global
residual-stream permutation (the learned D x D tensors pin the stream coordinates, like the original),
nor to the positive per-unit scalings of a ReLU MLP (a symmetry of the network the paper ignores).

Like the original, one instance handles exactly one architecture (fixed D, heads, head dims, MLP width,
number of blocks); other weight spaces are refused. Tensors other than q, k, v, o, up, up_bias, down,
down_bias (attention biases, norms, gates, embeddings, heads) are ignored; a missing up_bias / down_bias
is read as zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import WeightSpaceSpec
from ..weight_space import WeightSpace

USED_TENSORS = ("q", "k", "v", "o", "up", "up_bias", "down", "down_bias")
_ARCH_FIELDS = ("n_blocks", "d_model", "n_heads", "n_kv_heads", "head_dim_qk", "head_dim_vo", "mlp_width")

# Feature dict layout inside the model: name -> [B, C, L, *trailing dims of the canonical tensor].
Feats = dict[str, torch.Tensor]


def _arch(spec: WeightSpaceSpec) -> dict[str, int]:
    return {f: getattr(spec, f) for f in _ARCH_FIELDS}


class _Terms(nn.Module):
    """A bag of learned tensors, each [L, C_out, C_in, *extra] (per block, like the original).

    Every term is initialised N(0, 1 / (fan_in * n_terms_of_its_output)), so each output starts at a
    scale independent of D and of the number of terms; biases (no C_in axis) start at zero.
    """

    def __init__(self, n_blocks: int, c_in: int, c_out: int):
        super().__init__()
        self.L, self.c_in, self.c_out = n_blocks, c_in, c_out
        self.params = nn.ParameterDict()
        self._fan_in: dict[str, int] = {}
        self._output: dict[str, str] = {}

    def add(self, output: str, name: str, extra: tuple[int, ...] = (), reduced: int = 1, bias: bool = False,
            shape: tuple[int, ...] | None = None) -> None:
        """``shape`` overrides the default [L, C_out, C_in, *extra] layout (used for the D^3 tensors)."""
        if shape is None:
            shape = (self.L, self.c_out, *extra) if bias else (self.L, self.c_out, self.c_in, *extra)
        key = f"{output}__{name}"
        self.params[key] = nn.Parameter(torch.empty(shape))
        self._fan_in[key] = 0 if bias else self.c_in * reduced
        self._output[key] = output

    def reset_parameters(self) -> None:
        counts: dict[str, int] = {}
        for out in self._output.values():
            counts[out] = counts.get(out, 0) + 1
        with torch.no_grad():
            for key, p in self.params.items():
                if self._fan_in[key] == 0:
                    p.zero_()
                else:
                    p.normal_(0.0, 1.0 / math.sqrt(self._fan_in[key] * counts[self._output[key]]))

    def bias(self, output: str) -> torch.Tensor:
        """The bias of ``output`` as [1, C_out, L, *extra], to add to [B, C_out, L, ...] features."""
        return self.params[f"{output}__bias"].transpose(0, 1).unsqueeze(0)

    def p(self, output: str, name: str) -> torch.Tensor:
        return self.params[f"{output}__{name}"]


def _products(f: Feats, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over heads of W_q W_k^T and W_v W_o: two [B, C, L, D, D] tensors, GL-invariant per head."""
    k, v = f["k"], f["v"]
    if group_size > 1:  # grouped-query attention: each query head reads its key-value head
        k, v = k.repeat_interleave(group_size, dim=3), v.repeat_interleave(group_size, dim=3)
    qk = torch.einsum("bclhir,bclhjr->bclij", f["q"], k)
    vo = torch.einsum("bclhir,bclhrj->bclij", v, f["o"])
    return qk, vo


class PaperEquivariantLayer(nn.Module):
    """One equivariant layer of the paper's scheme, mapping C_in to C_out channels per tensor.

    Index names: i/j input-D (fixed, learned tensors), m middle-D (P_O, means only), n MLP units,
    k output-D of W_B / b_B (fixed). QK[i, j] has both indices on the input D; VO[i, m] goes from the
    input D (rows of W_v) to the middle D (columns of W_o).
    """

    def __init__(self, spec: WeightSpaceSpec, c_in: int, c_out: int):
        super().__init__()
        self.group_size = spec.group_size
        D, A = spec.d_model, spec.mlp_width
        t = self.terms = _Terms(spec.n_blocks, c_in, c_out)
        for name in ("q", "k", "v"):
            t.add(name, "mix", (D, D), D)
        t.add("o", "id")
        t.add("o", "mean")
        # The two D^3 tensors are stored [L, C_in, D, D, C_out, D]: einsum then reads them as a
        # [L, C_in*D*D, C_out*D] matrix without a copy (a third of the step time at D=32 otherwise).
        cube = (spec.n_blocks, c_in, D, D, c_out, D)
        # W_A [m, n]
        t.add("up", "qk", (D, D), D * D)
        t.add("up", "vo_all", (D,), D)
        t.add("up", "vo_row", (D,), D)
        for name in ("A_all", "A_row", "A_col", "A_id", "bA_all", "bA_id"):
            t.add("up", name)
        t.add("up", "B_all", (D,), D)
        t.add("up", "B_unit", (D,), D)
        t.add("up", "bB", (D,), D)
        t.add("up", "bias", bias=True)
        # b_A [n]
        t.add("up_bias", "qk", (D, D), D * D)
        t.add("up_bias", "vo", (D,), D)
        for name in ("A_all", "A_col", "bA_all", "bA_id"):
            t.add("up_bias", name)
        t.add("up_bias", "B_all", (D,), D)
        t.add("up_bias", "B_unit", (D,), D)
        t.add("up_bias", "bB", (D,), D)
        t.add("up_bias", "bias", bias=True)
        # W_B [n, k]
        t.add("down", "qk", reduced=D * D, shape=cube)  # the D^3 term
        t.add("down", "vo", (D, D), D)
        t.add("down", "A_all", (D,))
        t.add("down", "A_col", (D,))
        t.add("down", "B_units", (D, D), D)
        t.add("down", "B_mix", (D, D), D)
        t.add("down", "bA_all", (D,))
        t.add("down", "bA_id", (D,))
        t.add("down", "bB", (D, D), D)
        t.add("down", "bias", (D,), bias=True)
        # b_B [k]
        t.add("down_bias", "qk", reduced=D * D, shape=cube)  # the other D^3 term
        t.add("down_bias", "vo", (D, D), D)
        t.add("down_bias", "A_all", (D,))
        t.add("down_bias", "B", (D, D), D)
        t.add("down_bias", "bA", (D,))
        t.add("down_bias", "bB", (D, D), D)
        t.add("down_bias", "bias", (D,), bias=True)
        t.reset_parameters()
        self.mlp_width = A

    def forward(self, f: Feats) -> Feats:
        t = self.terms
        qk, vo = _products(f, self.group_size)
        A, bA, B, bB = f["up"], f["up_bias"], f["down"], f["down_bias"]
        A_all, A_row, A_col = A.mean((-2, -1)), A.mean(-1), A.mean(-2)  # [bcl], [bcl m], [bcl n]
        B_units = B.mean(-2)  # [bcl k]
        bA_all = bA.mean(-1)
        out: Feats = {}
        for name in ("q", "k", "v"):  # learned left mix over the input-D rows (keeps the right GL action)
            out[name] = torch.einsum("lecij,bclhjr->belhir", t.p(name, "mix"), f[name])
        o = f["o"]
        out["o"] = (torch.einsum("lec,bclhrm->belhrm", t.p("o", "id"), o)
                    + torch.einsum("lec,bclhr->belhr", t.p("o", "mean"), o.mean(-1)).unsqueeze(-1))

        # W_A [B, E, L, m, n]: scalars + middle-D vectors + unit vectors + identity
        s = (torch.einsum("lecij,bclij->bel", t.p("up", "qk"), qk)
             + torch.einsum("leci,bclim->bel", t.p("up", "vo_all"), vo)
             + torch.einsum("lec,bcl->bel", t.p("up", "A_all"), A_all)
             + torch.einsum("leck,bclnk->bel", t.p("up", "B_all"), B)
             + torch.einsum("lec,bcl->bel", t.p("up", "bA_all"), bA_all)
             + torch.einsum("leck,bclk->bel", t.p("up", "bB"), bB)
             + t.bias("up"))
        rows = (torch.einsum("leci,bclim->belm", t.p("up", "vo_row"), vo)
                + torch.einsum("lec,bclm->belm", t.p("up", "A_row"), A_row))
        units = (torch.einsum("lec,bcln->beln", t.p("up", "A_col"), A_col)
                 + torch.einsum("leck,bclnk->beln", t.p("up", "B_unit"), B)
                 + torch.einsum("lec,bcln->beln", t.p("up", "bA_id"), bA))
        out["up"] = (torch.einsum("lec,bclmn->belmn", t.p("up", "A_id"), A)
                     + s[..., None, None] + rows.unsqueeze(-1) + units.unsqueeze(-2))

        # b_A [B, E, L, n]
        s = (torch.einsum("lecij,bclij->bel", t.p("up_bias", "qk"), qk)
             + torch.einsum("leci,bclim->bel", t.p("up_bias", "vo"), vo)
             + torch.einsum("lec,bcl->bel", t.p("up_bias", "A_all"), A_all)
             + torch.einsum("leck,bclnk->bel", t.p("up_bias", "B_all"), B)
             + torch.einsum("lec,bcl->bel", t.p("up_bias", "bA_all"), bA_all)
             + torch.einsum("leck,bclk->bel", t.p("up_bias", "bB"), bB)
             + t.bias("up_bias"))
        out["up_bias"] = (s.unsqueeze(-1)
                          + torch.einsum("lec,bcln->beln", t.p("up_bias", "A_col"), A_col)
                          + torch.einsum("leck,bclnk->beln", t.p("up_bias", "B_unit"), B)
                          + torch.einsum("lec,bcln->beln", t.p("up_bias", "bA_id"), bA))

        # W_B [B, E, L, n, k]: output-D vectors broadcast over units + unit-by-output terms
        vec = (torch.einsum("lcijek,bclij->belk", t.p("down", "qk"), qk)
               + torch.einsum("lecik,bclim->belk", t.p("down", "vo"), vo)
               + torch.einsum("leck,bcl->belk", t.p("down", "A_all"), A_all)
               + torch.einsum("lecjk,bclj->belk", t.p("down", "B_units"), B_units)
               + torch.einsum("leck,bcl->belk", t.p("down", "bA_all"), bA_all)
               + torch.einsum("lecjk,bclj->belk", t.p("down", "bB"), bB)
               + t.bias("down"))
        out["down"] = (vec.unsqueeze(-2)
                       + torch.einsum("leck,bcln->belnk", t.p("down", "A_col"), A_col)
                       + torch.einsum("lecjk,bclnj->belnk", t.p("down", "B_mix"), B)
                       + torch.einsum("leck,bcln->belnk", t.p("down", "bA_id"), bA))

        # b_B [B, E, L, k]
        out["down_bias"] = (torch.einsum("lcijek,bclij->belk", t.p("down_bias", "qk"), qk)
                            + torch.einsum("lecik,bclim->belk", t.p("down_bias", "vo"), vo)
                            + torch.einsum("leck,bcl->belk", t.p("down_bias", "A_all"), A_all)
                            + torch.einsum("lecjk,bclj->belk", t.p("down_bias", "B"), B_units)
                            + torch.einsum("leck,bcl->belk", t.p("down_bias", "bA"), bA_all)
                            + torch.einsum("lecjk,bclj->belk", t.p("down_bias", "bB"), bB)
                            + t.bias("down_bias"))
        return out


class PaperInvariantLayer(nn.Module):
    """Seven summed terms per block -> [B, L, C_out], then a per-block LayerNorm."""

    def __init__(self, spec: WeightSpaceSpec, c_in: int, c_out: int):
        super().__init__()
        self.group_size = spec.group_size
        D = spec.d_model
        t = self.terms = _Terms(spec.n_blocks, c_in, c_out)
        t.add("inv", "qk", (D, D), D * D)
        t.add("inv", "vo", (D,), D)
        t.add("inv", "A")
        t.add("inv", "B", (D,), D)
        t.add("inv", "bA")
        t.add("inv", "bB", (D,), D)
        t.add("inv", "bias", bias=True)
        t.reset_parameters()
        self.norm_weight = nn.Parameter(torch.ones(spec.n_blocks, c_out))
        self.norm_bias = nn.Parameter(torch.zeros(spec.n_blocks, c_out))

    def forward(self, f: Feats) -> torch.Tensor:
        t = self.terms
        qk, vo = _products(f, self.group_size)
        x = (torch.einsum("lecij,bclij->ble", t.p("inv", "qk"), qk)
             + torch.einsum("leci,bclim->ble", t.p("inv", "vo"), vo)
             + torch.einsum("lec,bcl->ble", t.p("inv", "A"), f["up"].mean((-2, -1)))
             + torch.einsum("leck,bclnk->ble", t.p("inv", "B"), f["down"])
             + torch.einsum("lec,bcl->ble", t.p("inv", "bA"), f["up_bias"].mean(-1))
             + torch.einsum("leck,bclk->ble", t.p("inv", "bB"), f["down_bias"])
             + t.p("inv", "bias").unsqueeze(0))
        x = F.layer_norm(x, x.shape[-1:])
        return x * self.norm_weight + self.norm_bias


class PaperTransformerNFN(nn.Module):
    """The paper's invariant Transformer-NFN for one fixed architecture: WeightSpace -> [B, out_dim].

    Args:
        spec: the weight space it is built for; any other architecture is refused.
        hidden_channels: channels of every equivariant layer and of the invariant layer (paper: 10).
        n_equivariant_layers: equivariant layers before the invariant layer (paper: 2).
        out_dim: outputs of the MLP head.
        in_channels: channels C of the input weight spaces (batch dims [B, C]; [B] means C = 1).
        head_hidden: width of the MLP head's two hidden layers.
        sigmoid: squash the output to (0, 1) (accuracy prediction with BCE, as in the paper).
    """

    def __init__(
        self,
        spec: WeightSpaceSpec,
        hidden_channels: int = 10,
        n_equivariant_layers: int = 2,
        out_dim: int = 1,
        in_channels: int = 1,
        head_hidden: int = 10,
        sigmoid: bool = True,
    ):
        super().__init__()
        missing = [n for n in ("q", "k", "v", "o", "up", "down") if n not in spec.names]
        if missing:
            raise ValueError(f"PaperTransformerNFN needs block tensors q, k, v, o, up, down; the spec lacks {missing}")
        if spec.n_heads % spec.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        self.spec = spec
        self.in_channels = in_channels
        self.ignored = tuple(n for n in spec.names if n not in USED_TENSORS)
        chans = [in_channels] + [hidden_channels] * n_equivariant_layers
        self.layers = nn.ModuleList(PaperEquivariantLayer(spec, a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.invariant = PaperInvariantLayer(spec, chans[-1], hidden_channels)
        self.head = nn.Sequential(
            nn.Linear(spec.n_blocks * hidden_channels, head_hidden),
            nn.LayerNorm(head_hidden),
            nn.ReLU(),
            nn.Linear(head_hidden, head_hidden),
            nn.LayerNorm(head_hidden),
            nn.ReLU(),
            nn.Linear(head_hidden, out_dim),
        )
        self.sigmoid = sigmoid

    @classmethod
    def count_parameters(cls, spec: WeightSpaceSpec, **kwargs) -> int:
        """Parameter count for ``spec`` without allocating anything (built on the meta device)."""
        with torch.device("meta"):
            model = cls(spec, **kwargs)
        return sum(p.numel() for p in model.parameters())

    def check_spec(self, spec: WeightSpaceSpec) -> None:
        mine, theirs = _arch(self.spec), _arch(spec)
        if mine != theirs:
            diff = ", ".join(f"{k}={theirs[k]} (built for {mine[k]})" for k in mine if mine[k] != theirs[k])
            raise ValueError(
                f"PaperTransformerNFN handles one fixed architecture, like the paper's model: got {diff}. "
                "Build a new PaperTransformerNFN for this weight space."
            )

    def features(self, ws: WeightSpace) -> Feats:
        """The consumed tensors as [B, C, L, ...]; missing MLP biases become zeros."""
        self.check_spec(ws.spec)
        if len(ws.batch_shape) == 1:
            ws = ws.unsqueeze(1)
        if len(ws.batch_shape) != 2:
            raise ValueError(f"expected batch dims [B, C] or [B], got {ws.batch_shape}")
        if ws.batch_shape[1] != self.in_channels:
            raise ValueError(f"built for {self.in_channels} input channels, got {ws.batch_shape[1]}")
        s = self.spec
        f = {n: ws[n] for n in ("q", "k", "v", "o", "up", "down")}
        lead = (*ws.batch_shape, s.n_blocks)
        for name, width in (("up_bias", s.mlp_width), ("down_bias", s.d_model)):
            f[name] = ws[name] if name in ws else f["up"].new_zeros(*lead, width)
        return f

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        f = self.features(ws)
        for layer in self.layers:
            f = layer(f)
            for name in ("up", "up_bias", "down", "down_bias"):  # ReLU only on the MLP tensors
                f[name] = torch.relu(f[name])
        x = self.invariant(f).flatten(1)  # [B, L * C]
        y = self.head(x)
        return torch.sigmoid(y) if self.sigmoid else y
