"""The `WeightSpace` container: construction checks, batching, arithmetic, dtype, pytree and torch.func."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

from model_factories import build
from nfn_plugins import TensorSpec, WeightSpace, WeightSpaceSpec, extract_weights

pytestmark = pytest.mark.usefixtures("single_thread")


def _spec(d: int = 6, family: str = "toy") -> WeightSpaceSpec:
    s = WeightSpaceSpec(family=family, n_blocks=2, d_model=d, n_heads=2, n_kv_heads=1, head_dim_qk=2, head_dim_vo=2,
                        mlp_width=5, gated_mlp=False, mlp_scale="positive", rotary=False, stream_signs=False)
    tensors = tuple(s.block_tensor(n) for n in ("q", "k", "v", "o", "up", "down", "o_bias"))
    return s.with_tensors(tensors + (TensorSpec("embed.weight", (None, "stream"), (7, d), False, "embed"),))


def _random(spec: WeightSpaceSpec, *batch: int, seed: int = 0, dtype=torch.float64) -> WeightSpace:
    g = torch.Generator().manual_seed(seed)
    return WeightSpace(spec, {t.name: torch.randn(*batch, *t.shape, generator=g, dtype=dtype) for t in spec.tensors})


def _equal(a: WeightSpace, b: WeightSpace) -> bool:
    return a.spec == b.spec and all(torch.equal(a[n], b[n]) for n in a.spec.names)


# -- construction --------------------------------------------------------------------------------------
def test_construction_and_accessors():
    spec = _spec()
    ws = _random(spec)
    assert ws.batch_shape == () and ws.spec is spec
    assert list(ws) == list(spec.names) and "q" in ws and "gate" not in ws
    assert dict(ws.items()).keys() == set(spec.names)
    assert ws["q"].shape == (2, 2, 6, 2) and ws["k"].shape == (2, 1, 6, 2) and ws["o"].shape == (2, 2, 2, 6)
    assert ws.numel() == sum(int(torch.tensor(t.shape).prod()) for t in spec.tensors)
    assert ws.dtype == torch.float64 and ws.device == torch.device("cpu")
    r = repr(ws)
    assert r.startswith("WeightSpace(toy, batch=()") and "q=(2, 2, 6, 2)" in r
    assert spec["embed.weight"].role == "embed"
    with pytest.raises(KeyError, match="'nope' is not a tensor of this toy weight space"):
        spec["nope"]


def test_construction_errors():
    spec = _spec()
    good = {t.name: torch.zeros(t.shape) for t in spec.tensors}
    with pytest.raises(ValueError, match=r"missing \['q'\], unexpected \[\]"):
        WeightSpace(spec, {k: v for k, v in good.items() if k != "q"})
    with pytest.raises(ValueError, match=r"unexpected \['zzz'\]"):
        WeightSpace(spec, {**good, "zzz": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"tensor 'k' has shape \(2, 2, 6, 2\); its trailing dims must be \(2, 1, 6, 2\)"):
        WeightSpace(spec, {**good, "k": torch.zeros(2, 2, 6, 2)})
    with pytest.raises(ValueError, match="its trailing dims must be"):
        WeightSpace(spec, {**good, "o_bias": torch.zeros(6)})  # fewer dims than the spec
    batched = {k: v.unsqueeze(0) for k, v in good.items()}
    with pytest.raises(ValueError, match=r"batch shape \(3, 1\), others have \(1,\)"):
        WeightSpace(spec, {**batched, "v": torch.zeros(3, 1, 2, 1, 6, 2)})
    with pytest.raises(ValueError, match="not a multiple"):
        WeightSpaceSpec("toy", 1, 4, 3, 2, 2, 2, 4, False, "none", False, False)
    with pytest.raises(ValueError, match="even head_dim"):
        WeightSpaceSpec("toy", 1, 6, 2, 2, 3, 3, 4, False, "none", True, False)


# -- batching ------------------------------------------------------------------------------------------
def test_stack_and_unsqueeze():
    spec = _spec()
    a, b, c = (_random(spec, seed=s) for s in range(3))
    st = WeightSpace.stack([a, b, c])
    assert st.batch_shape == (3,)
    assert all(torch.equal(st[n][1], b[n]) for n in spec.names)
    st2 = WeightSpace.stack([st, st], dim=1)  # [3, 2]
    assert st2.batch_shape == (3, 2) and torch.equal(st2["q"][2, 1], c["q"])
    assert a.unsqueeze(0).batch_shape == (1,) and a.unsqueeze(-1).batch_shape == (1,)
    assert st.unsqueeze(0).batch_shape == (1, 3) and st.unsqueeze(1).batch_shape == (3, 1)
    assert st.unsqueeze(-1).batch_shape == (3, 1) and st.unsqueeze(-2).batch_shape == (1, 3)
    assert torch.equal(st.unsqueeze(1)["o"][:, 0], st["o"])
    for bad in (2, -3):
        with pytest.raises(IndexError, match="out of range"):
            st.unsqueeze(bad)


def test_as_features():
    spec = _spec()
    a = _random(spec)
    st = WeightSpace.stack([a, a, a, a])
    assert a.as_features().batch_shape == (1, 1)
    assert st.as_features().batch_shape == (4, 1)
    assert torch.equal(st.as_features()["up"][:, 0], st["up"])
    bc = st.unsqueeze(1)
    assert bc.as_features().batch_shape == (4, 1) and _equal(bc.as_features(), bc)
    with pytest.raises(ValueError, match="at most 2 batch dims"):
        bc.unsqueeze(0).as_features()


def test_stack_errors():
    a = _random(_spec())
    with pytest.raises(ValueError, match="empty"):
        WeightSpace.stack([])
    other = _random(_spec(d=8, family="other"))
    with pytest.raises(ValueError, match=r"weight space 1 is a different architecture \(other, D=8\) from weight space 0 \(toy, D=6\)"):
        WeightSpace.stack([a, other])


def test_stack_negative_dim_counts_among_batch_dims():
    a, b = _random(_spec(), seed=0), _random(_spec(), seed=1)
    st = WeightSpace.stack([a, b], dim=-1)
    assert st.batch_shape == (2,) and torch.equal(st["q"][1], b["q"])


# -- map, arithmetic, dtype ----------------------------------------------------------------------------
def test_map_and_arithmetic():
    spec = _spec()
    a, b = _random(spec, 3, seed=0), _random(spec, 3, seed=1)
    assert _equal(a.map(lambda x: x * 3), a * 3) and _equal(3 * a, a * 3)
    s, d = a + b, a - b
    for n in spec.names:
        assert torch.equal(s[n], a[n] + b[n]) and torch.equal(d[n], a[n] - b[n])
    assert _equal(a.zip_map(b, torch.maximum), WeightSpace(spec, {n: torch.maximum(a[n], b[n]) for n in spec.names}))
    assert _equal(a + a * 0, a)
    assert a.map(lambda x: x.sum(0)).batch_shape == ()
    with pytest.raises(ValueError, match="tensors do not match|trailing dims"):
        a.map(lambda x: x.flatten())  # a map must keep each tensor's spec shape


def test_mismatched_specs_do_not_combine():
    a, c = _random(_spec()), _random(_spec(d=8, family="other"))
    for op in (lambda: a + c, lambda: a - c, lambda: a.zip_map(c, torch.mul)):
        with pytest.raises(ValueError, match="different architectures"):
            op()


def test_dtype_conversion():
    a = _random(_spec(), 2)
    f = a.to(torch.float32)
    assert f.dtype == torch.float32 and all(f[n].dtype == torch.float32 for n in f)
    assert f.double().dtype == torch.float64 and torch.equal(f.double()["q"], a["q"].float().double())
    assert a.to("cpu").device.type == "cpu" and f.batch_shape == (2,)


# -- pytree / torch.func ---------------------------------------------------------------------------------
def test_pytree_round_trip():
    a = _random(_spec(), 2)
    leaves, treespec = pytree.tree_flatten(a)
    assert len(leaves) == len(a.spec.names) and all(l is a[n] for l, n in zip(leaves, a.spec.names))
    back = pytree.tree_unflatten([x.clone() for x in leaves], treespec)
    assert isinstance(back, WeightSpace) and _equal(back, a)
    doubled = pytree.tree_map(lambda x: x * 2, a)
    assert isinstance(doubled, WeightSpace) and _equal(doubled, a * 2)
    keyed, _ = pytree.tree_flatten_with_path({"w": a})
    assert [pytree.keystr(path) for path, _ in keyed] == [f"['w'][{n!r}]" for n in a.spec.names]
    # nested inside other containers
    nested = pytree.tree_map(lambda x: x + 1, {"w": a, "step": torch.tensor(1.0)})
    assert _equal(nested["w"], a.map(lambda x: x + 1))


def test_grad_of_a_function_of_a_weight_space():
    model, _ = build("bert")
    ws = extract_weights(model)

    def f(w: WeightSpace) -> torch.Tensor:
        return sum((w[n] ** 2).sum() for n in w.spec.names) + (w["q"] * w["k"]).sum()

    g = torch.func.grad(f)(ws)
    assert isinstance(g, WeightSpace) and g.spec == ws.spec
    assert torch.allclose(g["q"], 2 * ws["q"] + ws["k"]) and torch.allclose(g["k"], 2 * ws["k"] + ws["q"])
    assert torch.allclose(g["up"], 2 * ws["up"])
    # grad_and_value and argnums over several weight spaces
    def dist(a: WeightSpace, b: WeightSpace) -> torch.Tensor:
        d = a - b
        return sum((d[n] ** 2).sum() for n in d.spec.names)

    (ga, gb), val = torch.func.grad_and_value(dist, argnums=(0, 1))(ws, ws * 0.5)
    assert torch.allclose(ga["v"], ws["v"]) and torch.allclose(gb["v"], -ws["v"])
    assert torch.isclose(val, 0.25 * sum((ws[n] ** 2).sum() for n in ws.spec.names))




def test_vmap_over_a_weight_space_input():
    a = _random(_spec(), 4)
    norms = torch.func.vmap(lambda w: sum((w[n] ** 2).sum() for n in w.spec.names))(a)
    assert torch.allclose(norms, sum((a[n] ** 2).flatten(1).sum(1) for n in a.spec.names))


def test_vmap_returning_a_weight_space():
    a = _random(_spec(), 4)
    out = torch.func.vmap(lambda x: WeightSpace(a.spec, {n: a[n][0] * x for n in a.spec.names}))(torch.arange(4.0))
    assert out.batch_shape == (4,)


def test_vmap_through_tensors_works_today():
    """What does work: vmap over the tensors, rebuilding the WeightSpace inside (the in-tree workaround)."""
    a = _random(_spec(), 4)
    names = a.spec.names

    def per_example(*tensors):
        w = WeightSpace(a.spec, dict(zip(names, tensors)))
        assert w.batch_shape == ()
        return sum((w[n] ** 2).sum() for n in names)

    norms = torch.func.vmap(per_example)(*(a[n] for n in names))
    assert torch.allclose(norms, sum((a[n] ** 2).flatten(1).sum(1) for n in names))
