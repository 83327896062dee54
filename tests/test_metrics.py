"""Ranking metrics of the accuracy predictor: Kendall's tau-b and the label-noise ceiling."""

import pytest
import torch
from scipy.stats import kendalltau

from nfn_plugins.metrics import kendall_tau, label_noise_ceiling


def test_kendall_tau_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (300,), generator=gen).double()  # many ties on both sides
    y = x + torch.randint(0, 4, (300,), generator=gen).double()
    assert kendall_tau(x, y) == pytest.approx(kendalltau(x.numpy(), y.numpy()).statistic, abs=1e-12)


def test_label_noise_ceiling_falls_with_fewer_evaluation_examples_and_crowded_labels():
    spread = torch.linspace(0.1, 0.9, 200)
    assert label_noise_ceiling(spread, 10**7) > 0.99
    assert label_noise_ceiling(spread, 100) < label_noise_ceiling(spread, 1000) < 0.99
    # half the zoo near chance with independent noise: those pairs cannot be ranked, whatever the predictor
    crowded = torch.cat([spread, torch.full((200,), 0.1) + torch.linspace(0, 0.01, 200)])
    assert label_noise_ceiling(crowded, 1000) < label_noise_ceiling(spread, 1000) - 0.1


def test_label_noise_ceiling_keeps_exact_labels():
    # collapsed members score their class's frequency on the shared test subset: no noise between them
    spread = torch.linspace(0.2, 0.9, 100)
    collapsed = torch.tensor([0.098, 0.101, 0.115]).repeat_interleave(30)
    labels = torch.cat([spread, collapsed])
    exact = torch.cat([torch.zeros(100, dtype=torch.bool), torch.ones(90, dtype=torch.bool)])
    assert label_noise_ceiling(labels, 1000, exact=exact) > label_noise_ceiling(labels, 1000) + 0.1
    assert label_noise_ceiling(labels, 10**7, exact=exact) > 0.99
    assert label_noise_ceiling(collapsed, 100, exact=torch.ones(90, dtype=torch.bool)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exact has 3 entries"):
        label_noise_ceiling(labels, 1000, exact=torch.ones(3, dtype=torch.bool))


def test_label_noise_ceiling_refuses_non_accuracies():
    with pytest.raises(ValueError, match="accuracies in"):
        label_noise_ceiling(torch.tensor([0.5, 1.5]), 1000)
    with pytest.raises(ValueError, match="n_eval"):
        label_noise_ceiling(torch.tensor([0.5, 0.6]), 0)
