"""`WeightEditor`: equivariance of the delta (float64, random group elements), function-level consistency of
edits, the bound, in-place and PEFT application, training through `functional_call`, persistence, errors.

Every editor here has random non-zero gains (a fresh editor's are 0, which would make the delta zero and the
equivariance tests vacuous), and each equivariance test also checks that the group element moves the delta.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from model_factories import build, extra_axes, model_output, rel_err
from nfn_plugins import SymmetryGroup, WeightSpace, bind, extract_weights, load_weights
from nfn_plugins.editor import FROBENIUS_REFERENCE, MATRICES, WeightEditor

pytestmark = pytest.mark.usefixtures("exact_float64", "single_thread")

TOL = 1e-8
BROKEN = 1e-3


def _editor(seed: int = 0, **kwargs) -> WeightEditor:
    """A float64 editor with random gains of magnitude 0.3..1.5 (random signs): every target gets a delta."""
    torch.manual_seed(seed)
    editor = WeightEditor(**kwargs).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, editor.gain.shape, generator=g) * 2 - 1
        editor.gain.copy_(signs * (0.3 + 1.2 * torch.rand(editor.gain.shape, generator=g, dtype=torch.float64)))
    return editor


def _block_err(a: WeightSpace, b: WeightSpace) -> float:
    return max(rel_err(a[n], b[n]) for n in a if a.spec[n].block)


def _symmetric_pair(name: str, seed: int):
    model, make_inputs = build(name)
    ws = extract_weights(model)
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(seed), unit_scales=False)
    return model, make_inputs, ws, g


# -- equivariance -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", ["bert", "qwen2", "llama_tied", "vit"])
def test_delta_is_equivariant(name, seed):
    _, _, ws, g = _symmetric_pair(name, seed)
    editor = _editor(seed)
    delta = editor(ws)
    moved = g.act(delta)
    assert _block_err(moved, delta) > 0.1, "the group element barely moves the delta: the test could not fail"
    assert min(rel_err(delta[n], ws[n]) for n in ws if ws.spec[n].block) > 1e-3, "some block tensor is not edited"
    assert _block_err(editor(g.act(ws)), moved) < TOL
    for n in ws:
        if not ws.spec[n].block:
            assert not delta[n].any(), f"outer tensor {n} must not be edited"


@pytest.mark.parametrize("name", ["bert", "qwen2"])
def test_a_transformation_outside_the_group_moves_the_delta(name):
    """Negative control: query heads permuted while k, v, o stay is not a symmetry; the delta does not follow it."""
    _, _, ws, _ = _symmetric_pair(name, 0)
    editor = _editor(3)
    flip = lambda w: WeightSpace(w.spec, {**w.tensors, "q": w["q"].flip(1)})  # noqa: E731  head axis
    assert _block_err(editor(flip(ws)), flip(editor(ws))) > BROKEN


def test_batched_delta_matches_one_model_at_a_time():
    a, b = (extract_weights(build("qwen2", seed)[0]) for seed in (0, 1))
    editor = _editor(4)
    batched = editor(WeightSpace.stack([a, b]))
    for i, ws in enumerate((a, b)):
        assert _block_err(batched.map(lambda x, i=i: x[i]), editor(ws)) < 1e-12


@pytest.mark.parametrize("name", ["bert", "qwen2"])
def test_edit_commutes_with_the_symmetry(name):
    """A model and a symmetric copy, each edited in place, still compute the same function."""
    model, make_inputs, ws, g = _symmetric_pair(name, 5)
    twin = copy.deepcopy(model)
    load_weights(twin, g.act(ws))
    inputs = make_inputs(1)
    before = model_output(model, inputs)
    editor = _editor(5)
    editor.edit(model)
    editor.edit(twin)
    after = model_output(model, inputs)
    assert rel_err(after, before) > BROKEN, "the edit does not change the outputs: the test could not fail"
    assert rel_err(model_output(twin, inputs), after) < TOL


# -- identity at initialisation and the bound -------------------------------------------------------------
def test_fresh_editor_is_the_identity_edit():
    model, _ = build("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    delta = WeightEditor().double().edit(model)
    assert all(not delta[n].any() for n in delta)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _bound_ratios(ws: WeightSpace, delta: WeightSpace) -> dict[str, torch.Tensor]:
    """The bounded quantities of the module docstring, from explicit D x D products (not the Gram traces)."""
    g = ws.spec.group_size
    q, o = ws["q"], ws["o"]
    k, v = ws["k"].repeat_interleave(g, 1), ws["v"].repeat_interleave(g, 1)
    fro = lambda x: x.flatten(-2).norm(dim=-1)  # noqa: E731
    per_kv = lambda sq: sq.unflatten(1, (-1, g)).sum(2).sqrt()  # noqa: E731  sum of squares over each group
    qk, vo = fro(q @ k.transpose(-1, -2)), fro(v @ o)  # [L, H]
    ref_k, ref_v = per_kv(qk.square()), per_kv(vo.square())
    d = delta.tensors
    expand = lambda x: x.repeat_interleave(g, 1)  # noqa: E731  key-value heads -> query heads
    bias_norm = lambda x: x.flatten(-2).norm(dim=-1)  # noqa: E731  of a row or column vector
    ratios = {  # lazily: biases and gate exist in some families only
        "q": lambda: fro(d["q"] @ k.transpose(-1, -2)) / qk,
        "k": lambda: per_kv(fro(q @ expand(d["k"]).transpose(-1, -2)).square()) / ref_k,
        "v": lambda: per_kv(fro(expand(d["v"]) @ o).square()) / ref_v,
        "o": lambda: fro(v @ d["o"]) / vo,
        "q_bias": lambda: bias_norm(d["q_bias"].unsqueeze(-2) @ k.transpose(-1, -2)) / qk,
        "k_bias": lambda: per_kv(bias_norm(q @ expand(d["k_bias"]).unsqueeze(-1)).square()) / ref_k,
        "v_bias": lambda: per_kv(bias_norm(expand(d["v_bias"]).unsqueeze(-2) @ o).square()) / ref_v,
        "o_bias": lambda: d["o_bias"].norm(dim=-1) / vo.square().sum(-1).sqrt(),
    }
    for n, ref in FROBENIUS_REFERENCE.items():
        ratios[n] = lambda n=n, ref=ref: d[n].flatten(1).norm(dim=-1) / ws[ref].flatten(1).norm(dim=-1)
    return {n: ratio() for n, ratio in ratios.items() if n in ws}


@pytest.mark.parametrize("name", ["bert", "qwen2"])
def test_bound_holds_for_huge_inputs_and_outputs(name):
    model, _ = build(name)
    gen = torch.Generator().manual_seed(6)
    ws = extract_weights(model).map(lambda x: 1e3 * torch.randn(x.shape, generator=gen, dtype=x.dtype))
    editor = _editor(6, max_rel=0.05)
    with torch.no_grad():
        editor.gain.fill_(10.0)  # tanh(gain) = 1: the bound itself is all that limits the delta
        for p in editor.encoder.layers[-1].parameters():
            p.mul_(1e3)
    with torch.no_grad():
        ratios = _bound_ratios(ws, editor(ws))
    assert set(ratios) == {n for n in ws if ws.spec[n].block}
    worst = {n: float(r.max()) for n, r in ratios.items()}
    assert all(r <= 0.05 * (1 + 1e-9) for r in worst.values()), worst
    assert min(worst.values()) > 0.04, f"the bound is not reached for huge outputs: {worst}"


# -- applying edits ------------------------------------------------------------------------------------------
def test_in_place_edit_changes_exactly_the_block_parameters():
    model, _ = build("bert")
    before = {k: v.clone() for k, v in model.named_parameters()}
    ws = extract_weights(model)
    delta = _editor(7).edit(model)
    block = {h.name for h in bind(model).block_handles}
    assert block and any(k.startswith("classifier") for k in before) and any("embeddings" in k for k in before)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in block), name
    assert _block_err(extract_weights(model), ws + delta) < 1e-14


@pytest.mark.parametrize("name", ["bert", "qwen2"])
def test_exact_peft_adapter_matches_the_in_place_edit(name):
    model, make_inputs = build(name)
    inputs = make_inputs(2)
    editor = _editor(8, targets=MATRICES)
    edited = copy.deepcopy(model)
    editor.edit(edited)
    ws = extract_weights(model)
    peft_model = editor.as_peft_adapter(model)
    assert type(peft_model).__name__ == "PeftModel" and peft_model.active_adapter == "nfn_edit"
    assert rel_err(model_output(peft_model, inputs), model_output(edited, inputs)) < 1e-10
    assert _block_err(extract_weights(peft_model), extract_weights(edited)) < 1e-12  # as the library reads LoRA
    with peft_model.disable_adapter():  # the base weights are unchanged
        assert all(torch.equal(a, b) for a, b in zip(extract_weights(peft_model).tensors.values(), ws.tensors.values()))
    # a second adapter on the PeftModel is computed from the base weights: the same edit
    again = editor.as_peft_adapter(peft_model, adapter_name="second")
    assert again is peft_model and peft_model.active_adapter == "second"
    assert rel_err(model_output(peft_model, inputs), model_output(edited, inputs)) < 1e-10


def test_truncated_peft_adapter_is_reported_as_approximate():
    model, make_inputs = build("bert")
    inputs = make_inputs(3)
    editor = _editor(9, targets=MATRICES)
    exact = model_output(editor.as_peft_adapter(copy.deepcopy(model)), inputs)
    with pytest.warns(UserWarning, match="truncation error") as record:
        truncated = editor.as_peft_adapter(model, rank=2)
    error = float(re.search(r"truncation error ([0-9.e-]+)", str(record.pop(UserWarning).message)).group(1))
    assert 0.01 < error < 1
    layer = truncated.get_base_model().bert.encoder.layer[0].attention.self.query
    assert layer.lora_A["nfn_edit"].weight.shape == (2, 16)
    assert rel_err(model_output(truncated, inputs), exact) > 1e-6


def test_peft_adapter_refuses_what_lora_cannot_hold():
    bert, _ = build("bert")
    with pytest.raises(ValueError, match=r"matrix deltas only.*'q_bias'.*targets=MATRICES"):
        _editor(10).as_peft_adapter(bert)
    with pytest.raises(ValueError, match="the edit is zero"):
        WeightEditor(targets=MATRICES).double().as_peft_adapter(bert)
    gpt2, _ = build("gpt2_lm")
    with pytest.raises(ValueError, match=r"gpt2: .*attn\.c_attn\.weight \(conv1d\).*not separate nn\.Linear"):
        _editor(10, targets=MATRICES).as_peft_adapter(gpt2)
    assert not any("lora" in n for n, _ in bert.named_parameters())  # refused before wrapping anything


# -- training ----------------------------------------------------------------------------------------------
def test_training_through_functional_call_lowers_the_loss_of_the_edited_model():
    model, make_inputs = build("bert")
    model.requires_grad_(False)
    batch = {**make_inputs(4), "labels": torch.tensor([0, 2])}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    editor = WeightEditor(max_rel=0.2).double()  # fresh: the identity edit at step 0
    opt = torch.optim.Adam(editor.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        loss = torch.func.functional_call(model, editor.edited_parameters(model), kwargs=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # functional: model untouched
    with torch.no_grad():
        functional = torch.func.functional_call(model, editor.edited_parameters(model), kwargs=batch).logits
    editor.edit(model)
    assert rel_err(model_output(model, batch), functional) < 1e-12
    adapted = _editor(3, targets=MATRICES).as_peft_adapter(copy.deepcopy(model))
    with pytest.raises(ValueError, match="needs the plain model"):  # its names would not match the wrapped model's
        editor.edited_parameters(adapted)


# -- persistence and errors ----------------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    model, _ = build("qwen2")
    ws = extract_weights(model).float()
    editor = _editor(11, channels=4, max_rel=0.3, targets=("q", "k", "up")).float()
    editor.save_pretrained(tmp_path / "ed", note="test")
    loaded = WeightEditor.from_pretrained(tmp_path / "ed")
    assert loaded.config == editor.config and loaded.meta == {"note": "test"}
    a, b = editor(ws), loaded(ws)
    assert all(torch.equal(a[n], b[n]) for n in a) and a["q"].any() and not a["v"].any()
    (tmp_path / "ed" / "config.json").write_text('{"format": "nfn-plugins-accuracy-predictor/1", "config": {}}')
    with pytest.raises(ValueError, match="not an nfn-plugins weight editor"):
        WeightEditor.from_pretrained(tmp_path / "ed")


def test_bad_inputs_give_clear_errors():
    editor = _editor(12)
    with pytest.raises(ValueError, match="no supported stack of transformer blocks"):
        editor.edit(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    torch_model, _ = build("torch_pre_relu")  # its embedding and head need extra_axes, as for extract_weights
    with pytest.raises(ValueError, match="Pass extra_axes"):
        editor.edit(torch_model)
    assert editor.edit(torch_model, extra_axes("torch_pre_relu"))["up"].any()
    ws = extract_weights(build("bert")[0])
    with pytest.raises(ValueError, match=r"batch shape \(2, 3\)"):
        editor(ws.map(lambda x: x.expand((2, 3) + x.shape)))
    outer = ws.spec.with_tensors(tuple(t for t in ws.spec.tensors if not t.block))
    with pytest.raises(ValueError, match=r"missing \['q', 'k', 'v', 'o', 'up', 'down'\]"):
        editor(WeightSpace(outer, {t.name: ws[t.name] for t in outer.tensors}))
    with pytest.raises(ValueError, match=r"unknown: \['embeddings'\]"):
        WeightEditor(targets=("q", "embeddings"))
    with pytest.raises(ValueError, match="targets is empty"):
        WeightEditor(targets=())
    with pytest.raises(ValueError, match="rank must be a positive int"):
        editor.as_peft_adapter(build("bert")[0], rank=0)


def test_zoo_recipe_trains_and_reports_held_out_members(tmp_path):
    """recipes/train_editor.py end to end on a tiny real zoo: a loadable editor and a held-out report."""
    import importlib.util
    import json
    from pathlib import Path

    from nfn_plugins.zoo import build_zoo
    from nfn_plugins.zoo.presets import preset

    build_zoo(preset("tiny"), tmp_path / "zoo", progress=False)
    path = Path(__file__).parent.parent / "recipes" / "train_editor.py"
    spec = importlib.util.spec_from_file_location("train_editor", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert recipe.main(["--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "ed"), "--steps", "3",
                        "--test-images", "64"]) == 0
    report = json.loads((tmp_path / "ed" / "report.json").read_text())
    assert report["summary"]["held_out"]["members"] > 0 and report["summary"]["training"]["members"] > 0
    editor = WeightEditor.from_pretrained(tmp_path / "ed")
    assert float(editor.gain.abs().max()) > 0  # it trained
    with pytest.raises(SystemExit, match="need at least one of each"):
        recipe.main(["--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "x"), "--min-acc", "1.01"])
