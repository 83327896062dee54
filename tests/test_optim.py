"""NFNOptimizer: optimizer contract, equivariance, non-finite handling, resume, Trainer and accelerate use."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from model_factories import build
from nfn_plugins import SymmetryGroup, WeightSpace, extract_weights, load_weights
from nfn_plugins.optim import (DEFAULT_LEARNED_UPDATE, MUON_RMS, LearnedUpdate, NFNOptimizer, block_update,
                               head_covariance, head_inverse_sqrt, orthogonalized, orthogonalized_all, whiten)
from nfn_plugins.spec import BLOCK_AXES


def _loss(model, inputs) -> torch.Tensor:
    """A loss on an invariant output (so symmetric copies see the same loss landscape)."""
    out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out.pooler_output).square().mean()


def _train(model, opt, inputs, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, inputs).backward()
        opt.step()


def _learned(seed: int = 0, dtype=torch.float64, n_layers: int = 2) -> LearnedUpdate:
    torch.manual_seed(seed)
    lu = LearnedUpdate(channels=4, hidden=8, product_channels=2, n_layers=n_layers)
    with torch.no_grad():
        lu.gain.fill_(0.5)  # an active correction (a fresh one starts at exactly 0)
    return lu.to(dtype)


@pytest.mark.parametrize("name,n_layers,base,nesterov", [
    ("bert", 2, "adam", False), ("llama_tied", 2, "adam", False), ("bert", 1, "adam", False),
    ("bert", 2, "muon", True), ("llama_tied", 2, "muon", True), ("bert", 2, "muon", False),
    ("bert", 1, "muon", True), ("vit", 1, "muon", True)])  # one layer on Muon + Nesterov: the default update's
def test_update_is_equivariant(name, n_layers, base, nesterov, exact_float64):
    """update(g.W, g.G) = g.update(W, G) for orthogonal head maps + permutations, learned correction active,
    on either base direction (Muon's with and without Nesterov momentum)."""
    model, make_inputs = build(name)
    inputs = make_inputs(0)
    ws = extract_weights(model)
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(1), orthogonal=True, unit_scales=False)
    moved = copy.deepcopy(model)
    load_weights(moved, g.act(ws))
    learned = _learned(n_layers=n_layers)
    opt_a = NFNOptimizer(model, lr=1e-2, weight_decay=0.1, learned=learned, base_direction=base, nesterov=nesterov)
    opt_b = NFNOptimizer(moved, lr=1e-2, weight_decay=0.1, learned=learned, base_direction=base, nesterov=nesterov)
    _train(model, opt_a, inputs, 3)
    _train(moved, opt_b, inputs, 3)
    after, after_moved = extract_weights(model), extract_weights(moved)
    expected = g.act(after)
    assert max(float((after_moved[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in ws) < 1e-8
    assert float((after["q"] - ws["q"]).abs().max()) > 1e-3  # it did move


def test_plain_adam_is_not_equivariant_under_head_rotations(exact_float64):
    """Why the second moment is pooled per head: element-wise Adam breaks the orthogonal head symmetry."""
    model, make_inputs = build("bert")
    inputs = make_inputs(0)
    ws = extract_weights(model)
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(1), orthogonal=True, unit_scales=False)
    moved = copy.deepcopy(model)
    load_weights(moved, g.act(ws))
    _train(model, torch.optim.Adam(model.parameters(), lr=1e-2), inputs, 3)
    _train(moved, torch.optim.Adam(moved.parameters(), lr=1e-2), inputs, 3)
    expected = g.act(extract_weights(model))
    assert float((extract_weights(moved)["q"] - expected["q"]).abs().max() / expected["q"].abs().max()) > 1e-3


def test_orthogonalized_commutes_with_orthogonal_maps_and_equalises_singular_values():
    """orth(A x B) = A orth(x) B for orthogonal A, B (per matrix of a stack, float64); its singular values end
    near 1 (times the RMS scale) whatever x's spread; a stack = one matrix at a time."""
    gen = torch.Generator().manual_seed(0)
    randn = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)  # noqa: E731
    for shape in ((3, 2, 7, 4), (3, 2, 4, 7), (2, 4, 9)):  # per-head stacks in both orientations, an MLP-like one
        x = randn(shape) * torch.logspace(0, 2, shape[-1], dtype=torch.float64)  # spread singular values
        a = torch.linalg.qr(randn((*shape[:-1], shape[-2])))[0]
        b = torch.linalg.qr(randn((*shape[:-2], shape[-1], shape[-1])))[0]
        out = orthogonalized(x)
        assert out.shape == x.shape
        assert torch.allclose(orthogonalized(a @ x @ b), a @ out @ b, atol=1e-12)
        flat = x.reshape(-1, *shape[-2:])
        assert torch.allclose(torch.stack([orthogonalized(m) for m in flat]), out.reshape(flat.shape), atol=1e-14)
        sv = torch.linalg.svdvals(out) / (MUON_RMS * max(shape[-2:]) ** 0.5)
        assert 0.6 < float(sv.min()) and float(sv.max()) < 1.25  # the quintic iteration's band, not exactly 1
        assert float(torch.linalg.svdvals(x).max() / torch.linalg.svdvals(x).min()) > 10  # the input was spread


def test_orthogonalized_all_batches_by_shape_up_to_transposition():
    """One batched iteration per matrix shape gives each tensor its own `orthogonalized` (float64): tall and wide
    stacks of one shape share a batch, other shapes and stack sizes get their own."""
    gen = torch.Generator().manual_seed(1)
    xs = {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in
          {"q": (2, 3, 8, 4), "k": (2, 1, 8, 4), "o": (2, 3, 4, 8), "up": (2, 8, 16), "down": (2, 16, 8)}.items()}
    out = orthogonalized_all(xs)
    assert list(out) == list(xs)
    for name, x in xs.items():
        assert out[name].shape == x.shape
        assert torch.allclose(out[name], orthogonalized(x), atol=1e-13), name


def test_muon_base_changes_the_matrices_step_only(exact_float64):
    """With base_direction="muon" the block matrices take a different first step from equivariant Adam's, biases
    and norms the same one; the head covariances kept are the biases' only."""
    model, make_inputs = build("bert")
    inputs = make_inputs(0)
    twins = {b: copy.deepcopy(model) for b in ("adam", "muon")}
    opts = {b: NFNOptimizer(m, lr=1e-2, base_direction=b) for b, m in twins.items()}
    for b, m in twins.items():
        _train(m, opts[b], inputs, 1)  # from the same weights: the same gradients
    after = {b: extract_weights(m) for b, m in twins.items()}
    for name in after["adam"].spec.names:
        same = torch.equal(after["adam"][name], after["muon"][name])
        assert same == (name not in ("q", "k", "v", "o", "up", "down")), name
    kept = {k for st in opts["muon"].state.values() for k in st if k.startswith("head_cov_")}
    assert kept and all(k.endswith("_bias") for k in kept)


def test_nesterov_orthogonalises_the_momentum_one_step_ahead(exact_float64):
    """Muon's matrices step along orth(beta1 m' + (1 - beta1) g) with Nesterov, orth(m') without, where
    m' = beta1 m + (1 - beta1) g is the new momentum; biases and norms (Adam's direction) ignore the option."""
    model, _ = build("bert")
    ws = extract_weights(model)
    gen = torch.Generator().manual_seed(0)
    noise = lambda: {n: torch.randn(x.shape, generator=gen, dtype=x.dtype) for n, x in ws.items()}  # noqa: E731
    grads, m = WeightSpace(ws.spec, noise()), WeightSpace(ws.spec, noise())
    v = WeightSpace(ws.spec, {n: x.square() for n, x in noise().items()})
    lr, beta1 = 1e-2, 0.9
    new = {nesterov: block_update(None, ws, grads, m, v, {}, 3, lr, (beta1, 0.999), 1e-8, 0.0,
                                  base_direction="muon", nesterov=nesterov)[0] for nesterov in (False, True)}
    for name in ("q", "o", "up", "down"):
        m_new = beta1 * m[name] + (1 - beta1) * grads[name]
        for nesterov, ahead in ((False, m_new), (True, beta1 * m_new + (1 - beta1) * grads[name])):
            expected = ws[name] - lr * orthogonalized(ahead)
            assert torch.allclose(new[nesterov][name], expected, atol=1e-12), (name, nesterov)
        assert not torch.allclose(new[False][name], new[True][name], atol=1e-6)  # the option matters
    for name in ("q_bias", "o_bias", "norm1_weight"):
        assert torch.equal(new[False][name], new[True][name]), name


def _whitened(name: str, x: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return whiten(name, x, head_inverse_sqrt({name: cov})[name])


@pytest.mark.parametrize("name,shape", [("q", (3, 2, 7, 4)), ("o", (3, 2, 4, 7)), ("v_bias", (3, 2, 4))])
def test_head_whitening_commutes_with_orthogonal_head_maps(name, shape):
    """whiten(x R, cov(g R)) = whiten(x, cov(g)) R per head, R random orthogonal (float64); q-like tensors carry
    the head dimension last, o first (o moves as R^T o), biases are one row."""
    gen = torch.Generator().manual_seed(0)
    x, g = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    rot = torch.linalg.qr(torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64))[0]
    if name == "v_bias":
        rot = rot[:, :, None]  # [L, H, 1, d, d] acting on [L, H, d] rows
        act = lambda t: (t.unsqueeze(-2) @ rot.squeeze(2)).squeeze(-2)  # noqa: E731
    elif name == "o":
        act = lambda t: rot.transpose(-1, -2) @ t  # noqa: E731
    else:
        act = lambda t: t @ rot  # noqa: E731
    moved = _whitened(name, act(x), head_covariance(name, act(g)))
    assert torch.allclose(moved, act(_whitened(name, x, head_covariance(name, g))), atol=1e-12)
    assert not torch.allclose(_whitened(name, x, head_covariance(name, g)), x, atol=1e-3)  # it does something


def test_head_whitening_equalises_a_heads_directions_and_keeps_its_scale():
    """Rows whose spread differs 36x across the head's directions come out nearly isotropic, with the same
    overall size; a zero covariance (no gradient yet) leaves the direction unchanged."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))[0]
    rows = torch.randn(1, 1, 4000, 4, generator=gen, dtype=torch.float64) * torch.tensor([6.0, 3.0, 2.0, 1.0]) @ basis.T
    cov = head_covariance("q", rows)
    out = _whitened("q", rows, cov)
    spectrum = torch.linalg.eigvalsh(head_covariance("q", out)[0, 0])
    assert float(spectrum.max() / spectrum.min()) < 1.2 < float(torch.linalg.cond(cov[0, 0]))
    assert 0.9 < float(out.square().mean() / rows.square().mean()) < 1.1  # reshaped, not resized
    assert torch.equal(_whitened("q", rows, torch.zeros_like(cov)), rows)


def test_head_inverse_sqrt_batches_covariances_exactly_as_one_at_a_time():
    """One eigendecomposition per head size for all per-head tensors gives bit-identical whiteners to one call
    per tensor, with two head sizes and a zero covariance (a frozen tensor's) in the batch."""
    gen = torch.Generator().manual_seed(0)
    def cov(*shape):
        return head_covariance("q", torch.randn(*shape, generator=gen, dtype=torch.float64))
    covs = {"q": cov(2, 3, 5, 4), "k": cov(2, 3, 6, 4), "v": cov(2, 3, 5, 6), "o": torch.zeros(2, 3, 6, 6),
            "q_bias": cov(2, 3, 1, 4)}
    batched = head_inverse_sqrt(covs)
    assert batched.keys() == covs.keys()
    for name, c in covs.items():
        assert torch.equal(batched[name], head_inverse_sqrt({name: c})[name]), name
    assert torch.equal(batched["o"], torch.eye(6, dtype=torch.float64).expand(2, 3, 6, 6))
    assert not torch.allclose(batched["q"], torch.eye(4, dtype=torch.float64))


def test_untrained_learned_update_equals_equivariant_adam():
    model, make_inputs = build("gpt2_lm")
    twin = copy.deepcopy(model)
    inputs = make_inputs(0)
    fresh = LearnedUpdate(channels=4, hidden=8, product_channels=2).double()
    _train(model, NFNOptimizer(model, lr=1e-2), inputs, 2)
    _train(twin, NFNOptimizer(twin, lr=1e-2, learned=fresh), inputs, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_correction_is_bounded():
    model, _ = build("bert")
    lu = _learned()
    with torch.no_grad():
        lu.gain.fill_(100.0)
    ws = extract_weights(model)
    from nfn_plugins import WeightSpace

    inputs = WeightSpace.stack([ws.map(lambda x: 1e6 * torch.randn_like(x)) for _ in range(4)]).unsqueeze(0)
    corr = lu(inputs)
    assert max(float(c.detach().abs().max()) for c in corr.values()) <= lu.max_correction


def test_correction_fades_out_after_the_horizon():
    """Full correction for H steps, a linear fade to 0 at step 2H, then equivariant Adam without running the NFN."""
    model, make_inputs = build("bert")
    inputs = make_inputs(0)
    learned = _learned()
    calls = []
    learned.register_forward_hook(lambda *_: calls.append(1))
    twins = {h: copy.deepcopy(model) for h in (2, math.inf)}
    opts = {h: NFNOptimizer(m, lr=1e-2, learned=learned, correction_horizon=h) for h, m in twins.items()}
    trajectories = {h: [] for h in twins}
    for _ in range(6):
        for h, m in twins.items():
            _train(m, opts[h], inputs, 1)
            trajectories[h].append([p.detach().clone() for p in m.parameters()])
    same = [all(torch.equal(a, b) for a, b in zip(*(t[i] for t in trajectories.values()))) for i in range(6)]
    assert same == [True, True, False, False, False, False]
    assert len(calls) == 3 + 6  # horizon 2: steps 1-3 (step 3 at half strength); never fading: all 6

    # the scale enters linearly: half strength lies halfway between none and full (float64)
    ws = extract_weights(model)
    grads = ws.map(torch.randn_like)
    moments = ws.map(torch.zeros_like)
    new = {s: block_update(learned, ws, grads, moments, moments, {}, 3, 1e-2, (0.9, 0.999), 1e-8, 0.0, s)[0]
           for s in (0.0, 0.5, 1.0)}
    assert all(torch.allclose(new[0.5][k], (new[0.0][k] + new[1.0][k]) / 2, atol=1e-12) for k in new[0.5])
    assert any(not torch.equal(new[0.0][k], new[1.0][k]) for k in new[0.5])


def test_learned_update_sees_zero_moments_outside_the_blocks():
    """Meta-training keeps Adam moments for every tensor, the optimizer leaves the outer ones to its base
    optimizer: the NFN must read the same inputs in both, so block_update ignores the outer moments."""
    model, _ = build("bert")
    ws = extract_weights(model)
    torch.manual_seed(0)
    grads, moments = ws.map(torch.randn_like), ws.map(torch.randn_like)
    outer_moments = {n: x if n in BLOCK_AXES else 10 * torch.randn_like(x) for n, x in moments.items()}
    block_moments = {n: 10 * torch.randn_like(x) if n in BLOCK_AXES else x for n, x in moments.items()}
    learned = _learned()
    second = moments.map(torch.square)
    new = {case: block_update(learned, ws, grads, WeightSpace(ws.spec, m), second, {}, 3, 1e-2, (0.9, 0.999), 1e-8,
                              0.0)[0] for case, m in (("same", moments.tensors), ("outer", outer_moments),
                                                     ("blocks", block_moments))}
    assert all(torch.equal(new["same"][k], new["outer"][k]) for k in new["same"])
    assert not all(torch.allclose(new["same"][k], new["blocks"][k]) for k in new["same"])


@pytest.mark.parametrize("update", ["vit-mnist", DEFAULT_LEARNED_UPDATE])
def test_horizon_and_lr_default_to_the_values_validated_with_the_update(tmp_path, update):
    """A shipped update's metadata carries its validated base step, lr, horizon and token-embedding lr ratio;
    without them: the Adam base, the meta-training task length (no fade if unknown), lr 1e-3 and ratio 1;
    explicit arguments win."""
    model, _ = build("bert")
    shipped = LearnedUpdate.from_pretrained(update)
    assert shipped.horizon == shipped.meta["correction_horizon"] < shipped.meta["meta_config"]["task_steps"][1]
    opt = NFNOptimizer.from_pretrained(update, model)
    assert opt.correction_horizon == shipped.horizon
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == shipped.recommended_lr == shipped.meta["recommended_lr"]
    assert NFNOptimizer.from_pretrained(update, model, lr=0.5).param_groups[0]["lr"] == 0.5
    assert opt.param_groups[0]["base_direction"] == shipped.base_direction == shipped.meta["base_direction"] == "muon"
    assert NFNOptimizer.from_pretrained(update, model, base_direction="adam").param_groups[0]["base_direction"] == "adam"
    assert NFNOptimizer(model, learned=shipped, correction_horizon=math.inf).correction_horizon == math.inf
    # the token-embedding lr ratio validated on text (the default update's), else 1: no group of its own
    ratio = shipped.meta.get("embedding_lr_ratio", 1.0)
    assert opt.embedding_lr_ratio == shipped.embedding_lr_ratio == ratio == (0.1 if update == DEFAULT_LEARNED_UPDATE else 1)
    groups = {g["name"]: g["lr"] for g in opt.param_groups}
    assert groups.get("base_embeddings") == (None if ratio == 1 else ratio * shipped.recommended_lr)
    assert "base_embeddings" not in {g["name"] for g in NFNOptimizer.from_pretrained(update, model,
                                                                                     embedding_lr_ratio=1).param_groups}
    unvalidated = _learned()
    unvalidated.meta = {"meta_config": {"task_steps": [40, 240]}}
    unvalidated.save_pretrained(tmp_path / "u")
    assert NFNOptimizer.from_pretrained(tmp_path / "u", model).correction_horizon == 240
    assert NFNOptimizer.from_pretrained(tmp_path / "u", model).param_groups[0]["lr"] == 1e-3
    assert NFNOptimizer.from_pretrained(tmp_path / "u", model).param_groups[0]["base_direction"] == "adam"
    assert NFNOptimizer(model, learned=_learned()).correction_horizon == math.inf  # no metadata: never fades
    with pytest.raises(ValueError, match="correction_horizon must be a positive"):
        NFNOptimizer(model, learned=shipped, correction_horizon=0)


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_param_groups_state_dict_and_bit_identical_resume(base):
    model, make_inputs = build("llama_untied")
    inputs = make_inputs(0)
    opt = NFNOptimizer(model, lr=1e-2, learned=_learned(), base_direction=base, nesterov=True)
    assert [g["name"] for g in opt.param_groups] == ["nfn_blocks", "base"]
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len([p for p in model.parameters()])
    _train(model, opt, inputs, 2)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, inputs, 3)

    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    opt2 = NFNOptimizer(resumed, lr=1e-2, learned=_learned())  # the saved param group brings these choices
    assert opt2.param_groups[0]["nesterov"] is False  # the update's metadata does not ask for it
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["base_direction"] == base and opt2.param_groups[0]["nesterov"] is True
    assert opt2.base.param_groups[0] is opt2.param_groups[1]
    _train(resumed, opt2, inputs, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_a_base_optimizer_with_several_groups_shares_them_all():
    """A factory may split the outside parameters (say embedding tables at another lr): every group joins the
    optimizer's, so zero_grad clears them all, and a resume continues bit-identically."""
    model, make_inputs = build("bert")
    inputs = make_inputs(0)

    def make(m):
        tables = {id(mod.weight) for mod in m.modules() if isinstance(mod, torch.nn.Embedding)}

        def two_groups(params, lr, **kwargs):
            params = list(params)
            return torch.optim.AdamW([{"params": [p for p in params if id(p) in tables], "lr": 3 * lr},
                                      {"params": [p for p in params if id(p) not in tables]}], lr=lr, **kwargs)

        return NFNOptimizer(m, lr=1e-2, base_optimizer=two_groups)

    opt = make(model)
    assert [g["name"] for g in opt.param_groups] == ["nfn_blocks", "base", "base_1"]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 3e-2, 1e-2]
    _train(model, opt, inputs, 2)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, inputs, 2)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed)
    opt2.load_state_dict(saved_opt)
    assert opt2.base.param_groups == opt2.param_groups[1:]
    _train(resumed, opt2, inputs, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def test_token_embeddings_step_at_their_own_lr_ratio():
    """embedding_lr_ratio puts nn.Embedding tables in a group of their own at the base lr times the ratio (a
    scheduler keeps the ratio, a resume is bit-identical); a model without embedding tables trains exactly as
    with ratio 1."""
    model, make_inputs = build("bert")
    inputs = make_inputs(0)
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    opt = NFNOptimizer(model, lr=1e-2, base_kwargs={"lr": 4e-3}, embedding_lr_ratio=0.1)
    assert [g["name"] for g in opt.param_groups] == ["nfn_blocks", "base", "base_embeddings"]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 4e-3, 4e-3 * 0.1]
    assert {id(p) for p in opt.param_groups[2]["params"]} == {id(p) for p in tables}
    before = [t.detach().clone() for t in tables]
    _train(model, opt, inputs, 2)
    assert all(not torch.equal(a, b) for a, b in zip(before, tables))  # the tables do train
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, inputs, 2)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    opt2 = NFNOptimizer(resumed, lr=1e-2, base_kwargs={"lr": 4e-3}, embedding_lr_ratio=0.1)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, inputs, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5)
    assert [g["lr"] for g in opt2.param_groups] == [5e-3, 2e-3, 2e-3 * 0.1]
    # the ratio changes a text model's training, and leaves a ViT's (no embedding tables) bit for bit
    for name, changes in (("bert", True), ("vit", False)):
        runs = []
        for ratio in (1.0, 0.1):
            torch.manual_seed(0)
            m, make = build(name)
            o = NFNOptimizer(m, lr=1e-2, embedding_lr_ratio=ratio)
            assert len(o.param_groups) == (3 if changes and ratio != 1 else 2)
            _train(m, o, make(0), 3)
            runs.append([p.detach().clone() for p in m.parameters()])
        assert any(not torch.equal(a, b) for a, b in zip(*runs)) == changes


def test_state_saved_before_the_base_choices_existed_loads_as_what_it_ran():
    """A state dict from before ``base_direction`` and ``nesterov`` were options ran equivariant Adam, and Muon
    (had it run it) without Nesterov: loading it must not switch to today's defaults."""
    model, make_inputs = build("bert")
    opt = NFNOptimizer(model, lr=1e-2)
    _train(model, opt, make_inputs(0), 1)
    old = copy.deepcopy(opt.state_dict())
    for key in ("base_direction", "nesterov"):
        del old["param_groups"][0][key]
    resumed = NFNOptimizer(copy.deepcopy(model), lr=1e-2, base_direction="muon")
    assert resumed.param_groups[0]["nesterov"] is True  # the default without a learned update
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["base_direction"] == "adam" and resumed.param_groups[0]["nesterov"] is False


def test_base_optimizer_takes_its_own_lr_and_shares_betas():
    """base_kwargs' lr / weight_decay override the shared ones for the parameters outside the blocks (a scheduler
    then scales each group from its own lr); betas and eps reach the base optimizer unless it is told otherwise."""
    model, _ = build("bert")
    opt = NFNOptimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6,
                       base_kwargs={"lr": 2e-3, "weight_decay": 0.0})
    blocks, base = opt.param_groups
    assert (blocks["lr"], blocks["weight_decay"], base["lr"], base["weight_decay"]) == (1e-2, 0.1, 2e-3, 0.0)
    assert base["betas"] == (0.8, 0.99) and base["eps"] == 1e-6
    assert NFNOptimizer(model, betas=(0.8, 0.99), base_kwargs={"betas": (0.5, 0.9)}).base.defaults["betas"] == (0.5, 0.9)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert (blocks["lr"], base["lr"]) == (5e-3, 1e-3)


def test_scheduler_reaches_the_base_optimizer():
    model, make_inputs = build("bert")
    opt = NFNOptimizer(model, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert opt.base.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["lr"] == 0.5
    del sched


def test_base_optimizer_runs_multi_tensor_unless_told_otherwise():
    """foreach=True by default where the base optimizer takes it; a user's value wins; optimizers without
    the argument get none."""
    model, _ = build("bert")
    assert NFNOptimizer(model).base.defaults["foreach"] is True
    assert NFNOptimizer(model, base_kwargs={"foreach": False}).base.defaults["foreach"] is False

    class PlainSGD(torch.optim.SGD):
        def __init__(self, params, lr: float, weight_decay: float):
            super().__init__(params, lr=lr, weight_decay=weight_decay)

    assert NFNOptimizer(model, base_optimizer=PlainSGD).base.defaults["foreach"] is None  # SGD's own default


def test_closure_and_zero_grad():
    model, make_inputs = build("vit")
    inputs = make_inputs(0)
    opt = NFNOptimizer(model, lr=1e-3)

    def closure():
        opt.zero_grad()
        loss = _loss(model, inputs)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradients_never_reach_the_weights(policy):
    model, make_inputs = build("bert")
    opt = NFNOptimizer(model, lr=1e-2, nonfinite=policy)
    before = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    _loss(model, make_inputs(0)).backward()
    next(model.parameters()).grad[0] = float("nan")
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()
    else:
        with pytest.warns(UserWarning, match="step skipped"):
            opt.step()
        assert opt.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_logs_what_went_where(caplog):
    model, _ = build("torch_pre_relu")
    with caplog.at_level(logging.INFO, logger="nfn_plugins.optim"):
        opt = NFNOptimizer(model, extra_axes=None)
    assert "AdamW" in caplog.text and "unrecognised parameters sent to the base optimizer" in caplog.text
    # the torch family's embedding/head are unknown without extra_axes: they go to the base optimizer
    assert {h.name for h in opt.binding.unmatched} >= {"embed.weight"}


def test_frozen_block_parameters_stay_put_and_keep_no_state():
    """Freezing part of the blocks (e.g. the first layer): the rest trains, the frozen tensors neither move
    nor get moments or head covariances, and resuming from the state dict stays bit-identical."""
    model, make_inputs = build("bert")
    inputs = make_inputs(0)
    frozen = [p for name, p in model.named_parameters() if ".layer.0.attention." in name]
    assert frozen
    for p in frozen:
        p.requires_grad_(False)
    before = [p.detach().clone() for p in frozen]
    opt = NFNOptimizer(model, lr=1e-2, learned=_learned(dtype=torch.float32))
    _train(model, opt, inputs, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen))
    assert all(p not in opt.state for p in frozen)
    assert any(k.startswith("head_cov_") for st in opt.state.values() for k in st)
    twin = copy.deepcopy(model)
    twin_opt = NFNOptimizer(twin, lr=1e-2, learned=_learned(dtype=torch.float32))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(model, opt, inputs, 2)
    _train(twin, twin_opt, inputs, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_bad_arguments():
    model, _ = build("bert")
    with pytest.raises(ValueError, match="nonfinite"):
        NFNOptimizer(model, nonfinite="ignore")
    with pytest.raises(ValueError, match=r"base_direction must be one of \('adam', 'muon'\), got 'sgd'"):
        NFNOptimizer(model, base_direction="sgd")
    for ratio in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="embedding_lr_ratio must be a positive number"):
            NFNOptimizer(model, embedding_lr_ratio=ratio)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable transformer block"):
        NFNOptimizer(model)


def test_hf_trainer_one_liners(tmp_path):
    from transformers import Trainer, TrainingArguments

    from nfn_plugins.integrations.trainer import NFNTrainer

    model, make_inputs = build("bert")
    model = model.float()
    batch = make_inputs(0)
    rows = [{"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
             "labels": torch.tensor(i % 2)} for i in range(len(batch["input_ids"]))] * 4
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", learning_rate=1e-3, use_cpu=True)
    before = copy.deepcopy(model.state_dict())
    Trainer(model, args, train_dataset=rows, optimizers=(NFNOptimizer(model, lr=1e-3), None)).train()
    t = NFNTrainer(model, args, train_dataset=rows)
    t.train()
    assert isinstance(t.optimizer.optimizer if hasattr(t.optimizer, "optimizer") else t.optimizer, NFNOptimizer)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_accelerate_prepare_with_gradient_accumulation():
    from accelerate import Accelerator

    model, make_inputs = build("bert")
    model = model.float()
    inputs = make_inputs(0)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = NFNOptimizer(model, lr=1e-2)
    model, opt = acc.prepare(model, opt)
    before = copy.deepcopy(extract_weights(model)["q"])
    for i in range(4):
        with acc.accumulate(model):
            acc.backward(_loss(model, inputs))
            opt.step()
            opt.zero_grad()
        if i == 0:  # first micro-batch: accumulating, no update yet
            assert torch.equal(extract_weights(model)["q"], before)
    assert not torch.equal(extract_weights(model)["q"], before)


def test_learned_update_save_and_load(tmp_path):
    lu = _learned(dtype=torch.float32)
    lu.save_pretrained(tmp_path / "lu", note="test")
    loaded = LearnedUpdate.from_pretrained(tmp_path / "lu")
    assert all(torch.equal(a, b) for a, b in zip(lu.state_dict().values(), loaded.state_dict().values()))
    assert loaded.meta["note"] == "test"
    with pytest.raises(FileNotFoundError, match="shipped"):
        LearnedUpdate.from_pretrained("no-such-optimizer")
    with pytest.raises(ValueError, match="not an nfn-plugins learned optimizer"):
        from nfn_plugins.predictor import AccuracyPredictor, PredictorConfig

        AccuracyPredictor(PredictorConfig(channels=2, hidden=4, product_channels=1)).save_pretrained(tmp_path / "p")
        LearnedUpdate.from_pretrained(tmp_path / "p")
