"""The shipped NFN weights keep their meaning: outputs on fixed inputs equal those of the code they were
trained with (tests/data/shipped_outputs.json, in float64): `vit-mnist`'s since it was meta-trained
anew on the whitened equivariant Adam (2026-11-26, fifth session); the `mnist-paper` predictor's since it
was retrained with a two-layer head (2026-11-26); `vit-paper-1layer`'s since it shipped (2026-11-27);
`vit-paper-bert-1layer`'s and the `mnist-paper-long` predictor's since they shipped (2026-11-28); the
`mnist-paper-recipes` and `mnist-paper-recipes-collapse` predictors' since they shipped (2026-11-28, twenty-fifth
session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model_factories import build, extra_axes
from nfn_plugins import extract_weights
from nfn_plugins.optim import LearnedUpdate
from nfn_plugins.predictor import AccuracyPredictor
from nfn_plugins.weight_space import WeightSpace

GOLDEN = json.loads((Path(__file__).parent / "data" / "shipped_outputs.json").read_text())


def _inputs(name: str) -> WeightSpace:
    model, _ = build(name, 0)
    ws = extract_weights(model, extra_axes(name)).double()
    gen = torch.Generator().manual_seed(1)
    return ws.map(lambda x: torch.randn((3,) + x.shape, generator=gen, dtype=torch.float64) * 0.5)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-10 * max(abs(b), 1e-12)


@pytest.mark.parametrize("predictor", ["mnist-paper", "mnist-paper-long", "mnist-paper-recipes"])
@pytest.mark.parametrize("name", ["bert", "qwen2", "vit"])
def test_shipped_predictor_outputs_are_unchanged(predictor, name):
    pred = AccuracyPredictor.from_pretrained(predictor).double().predict(_inputs(name)).tolist()
    assert all(_close(a, b) for a, b in zip(pred, GOLDEN[f"predictor/{predictor}/{name}"], strict=True)), pred


def test_shipped_collapse_predictor_outputs_are_unchanged():
    """A predictor with a collapse head reads a 10-class output bias: the paper's MNIST model's weights."""
    from nfn_plugins.zoo.models import build_model, paper_arch

    ws = extract_weights(build_model(paper_arch())).double()
    gen = torch.Generator().manual_seed(1)
    batch = ws.map(lambda x: torch.randn((3,) + x.shape, generator=gen, dtype=torch.float64) * 0.5)
    pred = AccuracyPredictor.from_pretrained("mnist-paper-recipes-collapse").double().predict(batch).tolist()
    assert all(_close(a, b) for a, b in zip(pred, GOLDEN["predictor/mnist-paper-recipes-collapse/paper"], strict=True))


@pytest.mark.parametrize("update", ["vit-mnist", "vit-paper-1layer", "vit-paper-bert-1layer"])
@pytest.mark.parametrize("name", ["bert", "qwen2", "vit"])
def test_shipped_learned_update_outputs_are_unchanged(update, name):
    batch = _inputs(name)
    inp = WeightSpace.stack([batch.map(lambda t: t[i]) for i in range(3)] + [batch.map(lambda t: t[0].sign())])
    with torch.no_grad():
        correction = LearnedUpdate.from_pretrained(update).double()(inp.unsqueeze(0))
    expected = GOLDEN[f"learned_update/{update}/{name}"]
    assert set(correction) == set(expected)
    for key, (total, abs_total) in expected.items():
        assert _close(float(correction[key].sum()), total) and _close(float(correction[key].abs().sum()), abs_total), key


def test_shipped_vit_predictor_reads_a_vit_of_an_unseen_width_invariantly():
    from nfn_plugins.group import SymmetryGroup
    from nfn_plugins.zoo.models import make_vit

    shipped = {"mnist-paper", "mnist-paper-long", "mnist-paper-recipes", "mnist-paper-recipes-collapse", "mnist-vit"}
    assert shipped <= set(AccuracyPredictor.available())
    torch.manual_seed(0)
    ws = extract_weights(make_vit(d_model=40, n_heads=4, n_blocks=2)).double()  # the zoo has widths 16-64 by 16
    predictor = AccuracyPredictor.from_pretrained("mnist-vit").double()
    pred = float(predictor.predict(ws))
    assert 0.0 < pred < 1.0
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(1), unit_scales=False)
    assert _close(float(predictor.predict(g.act(ws))), pred)
