"""Probe features and the probing predictors: the networks' own outputs, exactly invariant, clear refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nfn_plugins import SymmetryGroup, WeightSpace
from nfn_plugins.baselines import ProbeMLP
from nfn_plugins.predictor import AccuracyPredictor, PredictorConfig
from nfn_plugins.probes import ProbeFeatures
from nfn_plugins.zoo import build_model, extract_zoo_weights, paper_arch

ARCHS = {"paper": paper_arch(d_model=16, n_heads=2, mlp_width=32, classifier_width=8),
         "vit": {"family": "vit", "d_model": 16, "n_heads": 2, "n_blocks": 2}}
WIDER_VIT = {"family": "vit", "d_model": 24, "n_heads": 4, "n_blocks": 1}
SMALL = PredictorConfig(channels=6, hidden=16, product_channels=2, invariant_dim=8, head_hidden=16)


def _members(arch: dict, n: int, seed: int) -> tuple[list[torch.nn.Module], WeightSpace]:
    """Float64 models with weights far from their init (so that outputs differ clearly between members)."""
    torch.manual_seed(seed)
    models = [build_model(arch).double().eval() for _ in range(n)]
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
    return models, WeightSpace.stack([extract_zoo_weights(m) for m in models])


@pytest.mark.parametrize("family", list(ARCHS))
def test_logits_are_each_members_own_forward(family):
    models, ws = _members(ARCHS[family], 3, 0)
    probe = ProbeFeatures(ARCHS[family], 4).double()
    expected = torch.stack([m(probe.probes.detach()) for m in models])
    assert torch.allclose(probe.logits(ws), expected, atol=1e-12)
    assert (expected[0] - expected[1]).abs().max() > 1e-2  # members differ: the check above can fail


@pytest.mark.parametrize("family", list(ARCHS))
def test_features_are_invariant_to_every_group_element_and_see_other_changes(family):
    _, ws = _members(ARCHS[family], 3, 1)
    probe = ProbeFeatures(ARCHS[family], 4).double()
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(2))
    moved = g.act(ws)
    assert max((moved[n] - ws[n]).abs().max() for n in ws.spec.names) > 1e-2  # g moves the weights
    assert (probe(moved) - probe(ws)).abs().max() < 1e-10
    nudged = ws.map(lambda x: x + 0.05 * torch.randn_like(x))  # not a symmetry: the features move
    assert (probe(nudged) - probe(ws)).abs().max() > 1e-4


def test_one_set_of_probes_runs_each_architecture_through_its_own_forward():
    archs = [ARCHS["vit"], WIDER_VIT, ARCHS["paper"]]
    probe = ProbeFeatures(archs, 3).double()
    for seed, arch in enumerate(archs):
        models, ws = _members(arch, 2, 10 + seed)
        assert torch.allclose(probe.logits(ws), torch.stack([m(probe.probes.detach()) for m in models]), atol=1e-12)
    _, unknown = _members({**WIDER_VIT, "n_blocks": 2}, 2, 13)
    with pytest.raises(ValueError, match="another architecture"):
        probe.logits(unknown)
    with pytest.raises(ValueError, match="same images and have the same classes"):
        ProbeFeatures([ARCHS["vit"], {**WIDER_VIT, "n_classes": 3}], 3)


def test_probing_predictors_are_invariant_and_round_trip(tmp_path):
    arch = ARCHS["paper"]
    _, ws = _members(arch, 3, 3)
    group = SymmetryGroup(ws.spec)
    # every head at once: the scale head must read the log-scales only, not the probe columns after them
    predictor = AccuracyPredictor(replace(SMALL, probes=4, probe_archs=[arch], n_classes=10,
                                          scale_head_layers=2)).double()
    baseline = ProbeMLP(arch, 4).double()
    # the predictor is invariant under the NFN's group (its log-norms see MLP-unit scales), probing under all of it
    for model, unit_scales in ((predictor, False), (baseline, True)):
        g = group.sample(torch.Generator().manual_seed(4), unit_scales=unit_scales)
        model.eval()
        with torch.no_grad():
            p, p_moved = model(ws), model(g.act(ws))
        assert (p - p_moved).abs().max() < 1e-10
    predictor.save_pretrained(tmp_path / "p")
    loaded = AccuracyPredictor.from_pretrained(tmp_path / "p").double()
    assert torch.equal(loaded.predict(ws), predictor.predict(ws))
    assert torch.equal(loaded.probe.probes, predictor.probe.probes)


def test_bad_probe_settings_are_refused():
    with pytest.raises(ValueError, match="token ids cannot be learned"):
        ProbeFeatures(paper_arch("text"), 4)
    with pytest.raises(ValueError, match="n_probes must be >= 1"):
        ProbeFeatures(ARCHS["paper"], 0)
    with pytest.raises(ValueError, match="give probe_archs"):
        AccuracyPredictor(replace(SMALL, probes=4))
    _, vit = _members(ARCHS["vit"], 2, 5)
    with pytest.raises(ValueError, match="another architecture"):
        ProbeFeatures(ARCHS["paper"], 4).double().logits(vit)
