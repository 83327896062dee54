"""Baselines: the paper's Transformer-NFN (its exact invariances and non-invariances, D^3 growth), STATNN
features / MLP / gradient-boosted trees, and the flat-weights MLP."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
import torch

from nfn_plugins.baselines import (
    STATISTICS,
    FlatMLP,
    PaperTransformerNFN,
    ScaleMLP,
    StatNN,
    fit_gbt,
    make_gbt,
    predict_gbt,
    statnn_feature_names,
    statnn_features,
    tensor_statistics,
)
from nfn_plugins.baselines.flat import _sample_indices
from nfn_plugins.baselines.paper_nfn import USED_TENSORS, PaperEquivariantLayer
from nfn_plugins.group import GroupElement, SymmetryGroup
from nfn_plugins.spec import TensorSpec, WeightSpaceSpec
from nfn_plugins.weight_space import WeightSpace

BLOCK_NAMES = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "up", "up_bias", "down", "down_bias",
               "norm1_weight", "norm1_bias")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to a busy machine's thread-sync stalls."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def make_spec(D=8, H=2, kv=None, A=6, L=2, names=BLOCK_NAMES, outer=True) -> WeightSpaceSpec:
    spec = WeightSpaceSpec(
        family="toy", n_blocks=L, d_model=D, n_heads=H, n_kv_heads=kv or H, head_dim_qk=D // H, head_dim_vo=D // H,
        mlp_width=A, gated_mlp=False, mlp_scale="positive", rotary=False, stream_signs=False,
    )
    tensors = [spec.block_tensor(n) for n in names]
    if outer:
        tensors.append(TensorSpec("embed.weight", (None, "stream"), (5, D), False, "embed"))
    return spec.with_tensors(tuple(tensors))


def rand_ws(spec: WeightSpaceSpec, batch: tuple[int, ...], gen, dtype=torch.float64) -> WeightSpace:
    return WeightSpace(spec, {t.name: 0.7 * torch.randn(*batch, *t.shape, generator=gen, dtype=dtype)
                              for t in spec.tensors})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def paper_group_element(spec: WeightSpaceSpec, gen) -> GroupElement:
    """Head permutations, per-head GL maps (Q/K and V/O) and MLP unit permutations: no stream permutation,
    no ReLU scales or stream signs (the part of our group the paper's model is built to respect)."""
    g = SymmetryGroup(spec).sample(gen, unit_scales=False)
    return replace(g, stream_perm=torch.arange(spec.d_model))


def permute_middle(ws_or_feats, perms: torch.Tensor, spec: WeightSpaceSpec):
    """The paper's P_O, per block: columns of W_o and rows of W_A. Works on [B, C, L, ...] tensors."""
    t = dict(ws_or_feats.items())
    L = spec.n_blocks
    t["o"] = torch.stack([t["o"][:, :, b][..., perms[b]] for b in range(L)], 2)
    t["up"] = torch.stack([t["up"][:, :, b][..., perms[b], :] for b in range(L)], 2)
    return WeightSpace(ws_or_feats.spec, t) if isinstance(ws_or_feats, WeightSpace) else t


# -- PaperTransformerNFN ------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_paper_nfn_invariant_to_heads_gl_and_mlp_perms(gen, heads):
    spec = make_spec(H=heads[0], kv=heads[1])
    torch.manual_seed(0)
    model = PaperTransformerNFN(spec, hidden_channels=3, sigmoid=False).double()
    ws = rand_ws(spec, (4, 1), gen)
    y = model(ws)
    for _ in range(3):
        g = paper_group_element(spec, gen)
        assert rel(model(g.act(ws)), y) < 1e-10
    # and the transformed input really differs (GL maps, permutations)
    assert rel(g.act(ws)["q"], ws["q"]) > 0.1


def test_paper_nfn_invariant_to_per_block_middle_permutation(gen):
    spec = make_spec()
    model = PaperTransformerNFN(spec, hidden_channels=3, sigmoid=False).double()
    ws = rand_ws(spec, (4, 1), gen)
    perms = torch.stack([torch.randperm(spec.d_model, generator=gen) for _ in range(spec.n_blocks)])
    assert rel(model(permute_middle(ws, perms, spec)), model(ws)) < 1e-10


def test_paper_nfn_is_not_invariant_to_stream_perm_or_relu_scales(gen):
    """What the paper's scheme does NOT respect: our global residual-stream permutation (learned D x D
    tensors pin the stream coordinates) and the positive per-unit scales of a ReLU MLP."""
    spec = make_spec()
    model = PaperTransformerNFN(spec, hidden_channels=3, sigmoid=False).double()
    ws = rand_ws(spec, (4, 1), gen)
    y = model(ws)
    group = SymmetryGroup(spec)
    g = group.sample(gen)
    stream_only = replace(group.identity(), stream_perm=g.stream_perm)
    scales_only = replace(group.identity(), mlp_scale=g.mlp_scale)
    assert rel(model(stream_only.act(ws)), y) > 1e-3
    assert rel(model(scales_only.act(ws)), y) > 1e-4


def test_paper_equivariant_layer_is_equivariant(gen):
    """Layer level: layer(g . x) == g . layer(x) for the paper group elements and P_O, channels 2 -> 3."""
    spec = make_spec(names=USED_TENSORS, outer=False)
    layer = PaperEquivariantLayer(spec, 2, 3).double()
    ws = rand_ws(spec, (3, 2), gen)
    run = lambda w: WeightSpace(spec, layer(dict(w.items())))  # noqa: E731
    g = paper_group_element(spec, gen)
    out, expected = run(g.act(ws)), g.act(run(ws))
    for name in USED_TENSORS:
        assert rel(out[name], expected[name]) < 1e-10, name
    perms = torch.stack([torch.randperm(spec.d_model, generator=gen) for _ in range(spec.n_blocks)])
    out, expected = run(permute_middle(ws, perms, spec)), permute_middle(run(ws), perms, spec)
    for name in USED_TENSORS:
        assert rel(out[name], expected[name]) < 1e-10, name


def test_paper_nfn_parameters_grow_as_d_cubed():
    counts = {D: PaperTransformerNFN.count_parameters(make_spec(D=D, H=2, A=2 * D)) for D in (16, 32, 64)}
    # the two [C_out, C_in, D, D, D] tensors per block and layer: (1*10 + 10*10) channel pairs, 2 blocks
    cubic = lambda D: 2 * 2 * (1 * 10 + 10 * 10) * D**3  # noqa: E731
    for D, n in counts.items():
        assert cubic(D) < n < 1.5 * cubic(D)
    assert 6 < counts[32] / counts[16] <= 8
    assert 7 < counts[64] / counts[32] <= 8
    # built model agrees with the meta-device count
    model = PaperTransformerNFN(make_spec(D=16, H=2, A=32))
    assert sum(p.numel() for p in model.parameters()) == counts[16]


def test_paper_nfn_fixed_architecture_and_io(gen):
    spec = make_spec()
    model = PaperTransformerNFN(spec, hidden_channels=4, out_dim=2)
    ws = rand_ws(spec, (5,), gen, torch.float32)  # batch dims [B] = one channel
    y = model(ws)
    assert y.shape == (5, 2) and bool(((y > 0) & (y < 1)).all())
    assert torch.allclose(model(ws.unsqueeze(1)), y)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert set(model.ignored) == {"q_bias", "k_bias", "v_bias", "o_bias", "norm1_weight", "norm1_bias", "embed.weight"}
    with pytest.raises(ValueError, match="one fixed architecture"):
        model(rand_ws(make_spec(D=12), (2,), gen, torch.float32))
    with pytest.raises(ValueError, match="one fixed architecture"):
        model(rand_ws(make_spec(A=7), (2,), gen, torch.float32))
    # MLP biases absent from the spec are read as zeros
    no_bias = make_spec(names=("q", "k", "v", "o", "up", "down"), outer=False)
    m2 = PaperTransformerNFN(no_bias, hidden_channels=2)
    assert m2(rand_ws(no_bias, (3,), gen, torch.float32)).shape == (3, 1)


# -- STATNN -------------------------------------------------------------------------------------
def test_tensor_statistics_match_torch():
    x = torch.randn(3, 101, dtype=torch.float64)
    s = tensor_statistics(x)
    q = torch.quantile(x, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64), dim=-1).T
    torch.testing.assert_close(s[:, 2:], q)
    torch.testing.assert_close(s[:, 0], x.mean(-1))
    torch.testing.assert_close(s[:, 1], x.var(-1, correction=0))


def test_statnn_features_shape_names_and_permutation_invariance(gen):
    spec = make_spec()
    ws = rand_ws(spec, (4,), gen)
    f = statnn_features(ws)
    names = statnn_feature_names(spec)
    n_block = sum(1 for t in spec.tensors if t.block)
    assert f.shape == (4, 7 * (n_block * spec.n_blocks + 1)) == (4, len(names))
    assert names[:2] == ["q[0].mean", "q[0].var"] and names[-1] == "embed.weight.q100"
    assert statnn_features(ws, per_block=False).shape == (4, 7 * len(spec.tensors))
    assert statnn_features(ws.unsqueeze(1).map(lambda x: x.expand(4, 2, *x.shape[2:]))).shape == (4, 2 * f.shape[1])
    # single weight space (no batch dims) and its row in the batch agree
    one = WeightSpace(spec, {k: v[1] for k, v in ws.items()})
    torch.testing.assert_close(statnn_features(one)[0], f[1])
    # statistics of a tensor ignore the order of its entries: every permutation symmetry leaves them unchanged
    g = SymmetryGroup(spec).sample(gen, permutations_only=True)
    torch.testing.assert_close(statnn_features(g.act(ws)), f)


def test_statnn_model(gen):
    spec = make_spec()
    model = StatNN(spec, hidden=(16, 16))
    train = rand_ws(spec, (8,), gen, torch.float32)
    model.fit_normalizer(train)
    z = model.normalizer(model.features(train))
    assert z.mean(0).abs().max() < 1e-4
    y = model(train)
    assert y.shape == (8, 1)
    y.sum().backward()
    torch.testing.assert_close(model(statnn_features(train)), y.detach())
    assert sum(p.numel() for p in model.parameters()) == (model.n_features + 1) * 16 + 17 * 16 + 17


def test_statnn_pooled_over_blocks_reads_every_width_and_depth(gen):
    spec = make_spec()
    pooled, per_block = StatNN(spec, hidden=(8,), per_block=False), StatNN(spec, hidden=(8,))
    wider, deeper = make_spec(D=12, H=3, A=10), make_spec(L=3)
    for other in (wider, deeper):
        assert pooled.features(rand_ws(other, (2,), gen)).shape == (2, pooled.n_features)
    assert per_block.features(rand_ws(wider, (2,), gen)).shape == (2, per_block.n_features)
    with pytest.raises(ValueError, match="depth"):
        per_block.features(rand_ws(deeper, (2,), gen))
    with pytest.raises(ValueError, match="tensor names"):
        pooled.features(rand_ws(make_spec(outer=False), (2,), gen))


def test_gbt_on_statnn_features(gen):
    pytest.importorskip("sklearn")
    spec = make_spec()
    ws = rand_ws(spec, (40,), gen)
    y = ws["q"].flatten(1).std(1)  # a target the statistics determine
    for kind in ("hist", "gbr"):
        model = fit_gbt(ws, y, kind=kind, max_iter=30) if kind == "hist" else fit_gbt(ws, y, kind=kind, n_estimators=30)
        pred = predict_gbt(model, ws)
        assert pred.shape == (40,)
        assert torch.corrcoef(torch.stack([pred, y]))[0, 1] > 0.8
    with pytest.raises(ValueError, match="kind"):
        make_gbt("xgboost")


def test_gbt_without_sklearn_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        make_gbt()


# -- flat MLP -----------------------------------------------------------------------------------
def test_flat_mlp_full_and_subset(gen):
    spec = make_spec()
    ws = rand_ws(spec, (3,), gen)
    full = FlatMLP(spec, hidden=(8,)).double()
    x = full.flatten(ws)
    assert x.shape == (3, ws.numel() // 3)
    torch.testing.assert_close(x, torch.cat([v.reshape(3, -1) for v in ws.tensors.values()], 1))

    sub = FlatMLP(spec, hidden=(8,), max_features=50, seed=3).double()
    xs = sub.flatten(ws)
    assert xs.shape == (3, 50) and sub.n_features == 50
    idx = _sample_indices(full.n_weights, 50, torch.Generator().manual_seed(3))
    torch.testing.assert_close(xs, x[:, idx])  # the same fixed index set, in global order
    again = FlatMLP(spec, hidden=(8,), max_features=50, seed=3).double()
    torch.testing.assert_close(again.flatten(ws), xs)
    assert sum(p.numel() for p in sub.parameters()) == 51 * 8 + 9

    sub.fit_normalizer(ws)
    y = sub(ws)
    assert y.shape == (3, 1)
    y.sum().backward()
    with pytest.raises(ValueError, match="different weight space"):
        sub.flatten(rand_ws(make_spec(D=12), (2,), gen))


def test_sample_indices_large_total():
    g = torch.Generator().manual_seed(0)
    idx = _sample_indices(50_000_000, 1000, g)
    assert idx.shape == (1000,) and bool((idx[1:] > idx[:-1]).all()) and 0 <= int(idx[0]) and int(idx[-1]) < 50_000_000
    assert STATISTICS == ("mean", "var", "q0", "q25", "q50", "q75", "q100")


@pytest.mark.parametrize("kv", [None, 1])  # multi-head and grouped-query (one key-value head)
def test_invariant_statnn_features_are_invariant_under_the_nfn_group(kv):
    spec = make_spec(kv=kv)
    gen = torch.Generator().manual_seed(3)
    ws = rand_ws(spec, (4,), gen)
    g = SymmetryGroup(spec).sample(gen, unit_scales=False)
    moved = g.act(ws)
    inv = statnn_features(ws, invariant=True)
    assert inv.shape[-1] == 7 * 2 * (len(BLOCK_NAMES) - 7 + 5) + 7  # per block: 7 plain tensors + 5 products
    assert rel(statnn_features(moved, invariant=True), inv) < 1e-8
    assert rel(statnn_features(moved), statnn_features(ws)) > 1e-3  # the plain features see the GL maps
    assert len(statnn_feature_names(spec, invariant=True)) == inv.shape[-1]
    with pytest.raises(ValueError, match="not both"):
        statnn_features(ws, tensors=["up"], invariant=True)


# -- ScaleMLP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [False, True])
def test_scale_mlp_is_invariant_and_takes_any_architecture(sizes):
    gen = torch.Generator().manual_seed(4)
    model = ScaleMLP(sizes=sizes).double()
    outputs = []
    for spec in (make_spec(), make_spec(D=12, H=4, kv=2, A=10, L=3)):
        ws = rand_ws(spec, (5,), gen)
        g = SymmetryGroup(spec).sample(gen, unit_scales=False)
        assert rel(model(g.act(ws)), model(ws)) < 1e-10
        outputs.append(model(ws))
    assert all(o.shape == (5, 1) and ((o > 0) & (o < 1)).all() for o in outputs)
    # it reads only the norms: rescaling one tensor type changes the prediction
    ws = rand_ws(make_spec(), (5,), gen)
    scaled = WeightSpace(ws.spec, {**ws.tensors, "up": 3 * ws["up"]})
    assert rel(model(scaled), model(ws)) > 1e-4


def test_scale_mlp_sizes_are_the_log_sizes_of_the_architecture():
    """The last three features are log(width), log(MLP width), log(heads); the others are the plain ScaleMLP's."""
    gen = torch.Generator().manual_seed(5)
    spec = make_spec(D=12, H=4, kv=2, A=10, L=3)
    ws = rand_ws(spec, (2,), gen)
    plain, with_sizes = ScaleMLP().double().features(ws), ScaleMLP(sizes=True).double().features(ws)
    assert torch.equal(with_sizes[:, : plain.shape[1]], plain)
    expected = torch.tensor([math.log(12), math.log(10), math.log(4)], dtype=torch.float64)
    assert torch.allclose(with_sizes[:, plain.shape[1] :], expected.expand(2, 3))
