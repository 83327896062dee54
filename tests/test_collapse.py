"""The collapse head: members that predict one class score that class's frequency; the head ranks them by
the class their output bias picks, stays invariant, persists, and refuses what it cannot read."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_predictor import SMALL, _synthetic

from nfn_plugins import SymmetryGroup
from nfn_plugins.metrics import kendall_tau
from nfn_plugins.nn.collapse import class_accuracies, mix_collapsed, output_bias_name
from nfn_plugins.predictor import AccuracyPredictor, FitConfig

FREQUENCIES = torch.tensor([0.41, 0.59])  # the two classes' shares of a test set


def _with_collapsed(n: int, seed: int):
    """`_synthetic` BERT weights where about half the members collapsed: their MLP is nearly dead and their
    label is the frequency of the class their output bias favours (0.41 or 0.59, inside the others' range)."""
    ws, y = _synthetic(n, 16, seed)
    collapsed = torch.rand(n, generator=torch.Generator().manual_seed(seed + 100)) < 0.5
    ws.tensors["up"] = torch.where(collapsed[:, None, None, None], 0.05 * ws["up"], ws["up"])
    picks = ws["classifier.bias"].argmax(-1)
    return ws, torch.where(collapsed, FREQUENCIES[picks], y), collapsed


def test_class_accuracies_and_the_mixture():
    bias = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([0.6, 0.4, 0.8, 0.9])
    collapsed = torch.tensor([True, True, True, False])
    assert torch.allclose(class_accuracies(bias, labels, collapsed), torch.tensor([0.4, 0.7]))
    # a class no collapsed member picks falls back to the mean over the collapsed ones
    assert torch.allclose(class_accuracies(bias, labels, torch.tensor([True, False, True, False])),
                          torch.tensor([0.7, 0.7]))
    main, pi = torch.tensor([0.9, 0.9, 0.5, 0.2]), torch.tensor([1.0, 0.0, 0.5, 1.0])
    mixed = mix_collapsed(main, pi, bias, torch.tensor([0.1, 0.3]))
    assert torch.allclose(mixed, torch.tensor([0.3, 0.9, 0.4, 0.1]))


def test_collapse_head_ranks_collapsed_members_the_plain_head_cannot():
    """With two classes the plain NFN pools the output bias by mean and RMS, which cannot tell which entry
    is larger: it ranks the collapsed members at random. The collapse head ranks them exactly."""
    (ws, y, collapsed), (val_ws, val_y, val_collapsed) = _with_collapsed(64, 0), _with_collapsed(48, 1)
    taus = {}
    for n_classes in (0, 2):
        torch.manual_seed(0)
        model = AccuracyPredictor(replace(SMALL, n_classes=n_classes))
        model.fit((ws, y), (val_ws, val_y), FitConfig(epochs=8, batch_size=8, lr=1e-2), progress=False,
                  collapsed=[collapsed] if n_classes else None)
        pred = model.predict(val_ws)
        taus[n_classes] = kendall_tau(pred[val_collapsed], val_y[val_collapsed])
    assert torch.allclose(model.collapse.class_accuracy, FREQUENCIES)
    assert taus[2] > 0.9 and abs(taus[0]) < 0.5, taus


def test_collapse_head_prediction_is_invariant_and_persists(tmp_path):
    model = AccuracyPredictor(replace(SMALL, n_classes=2)).double()
    with torch.no_grad():
        model.collapse.class_accuracy.copy_(FREQUENCIES)
        torch.nn.init.normal_(model.collapse.gate[-1].weight)
    ws, _ = _synthetic(4, 16, 5)
    ws = ws.double()
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(0), unit_scales=False)
    assert (model.predict(ws) - model.predict(g.act(ws))).abs().max() < 1e-10
    model.save_pretrained(tmp_path / "p")
    loaded = AccuracyPredictor.from_pretrained(tmp_path / "p").double()
    assert loaded.config.n_classes == 2 and torch.equal(loaded.collapse.class_accuracy, FREQUENCIES.double())
    assert torch.equal(loaded.predict(ws), model.predict(ws))


def test_collapse_head_refuses_what_it_cannot_read():
    ws, y = _synthetic(8, 16, 6)
    cfg = FitConfig(epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="must know which training members collapsed"):
        AccuracyPredictor(replace(SMALL, n_classes=2)).fit((ws, y), config=cfg, progress=False)
    with pytest.raises(ValueError, match=r"masks of lengths \[3\] do not match .* \[8\] members"):
        AccuracyPredictor(replace(SMALL, n_classes=2)).fit((ws, y), config=cfg, progress=False,
                                                           collapsed=[torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="this predictor has none"):
        AccuracyPredictor(SMALL).fit((ws, y), config=cfg, progress=False, collapsed=[torch.ones(8, dtype=torch.bool)])
    with pytest.raises(ValueError, match="no output bias of 3 classes"):
        AccuracyPredictor(replace(SMALL, n_classes=3)).predict(ws)
    assert output_bias_name(ws.spec, 2) == "classifier.bias"
