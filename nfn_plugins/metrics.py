"""Ranking and regression metrics for accuracy prediction (the paper's protocol reports Kendall's tau)."""

from __future__ import annotations

import torch


def kendall_tau(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Kendall's tau-b (ties handled), O(n^2) memory in chunks; fine for tens of thousands of points."""
    x, y = pred.detach().double().flatten(), target.detach().double().flatten()
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"need two equal-length vectors with >= 2 entries, got {x.numel()} and {y.numel()}")
    concordant = ties_x = ties_y = total = 0.0
    for start in range(0, x.numel(), 2048):
        dx = torch.sign(x[start : start + 2048, None] - x[None, :])
        dy = torch.sign(y[start : start + 2048, None] - y[None, :])
        concordant += float((dx * dy).sum())
        ties_x += float((dx == 0).sum())
        ties_y += float((dy == 0).sum())
        total += dx.numel()
    n_pairs = total - x.numel()  # ordered pairs without the diagonal
    denom = ((n_pairs - (ties_x - x.numel())) * (n_pairs - (ties_y - x.numel()))) ** 0.5
    return concordant / denom if denom > 0 else float("nan")


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    pred, target = pred.detach().double().flatten(), target.detach().double().flatten()
    ss_res = float(((target - pred) ** 2).sum())
    ss_tot = float(((target - target.mean()) ** 2).sum())
    return 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def l1_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred.detach().double().flatten() - target.detach().double().flatten()).abs().mean())


def regression_report(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {"kendall_tau": kendall_tau(pred, target), "r2": r2_score(pred, target), "l1": l1_error(pred, target)}


def label_noise_ceiling(accuracies: torch.Tensor, n_eval: int, draws: int = 100, seed: int = 0,
                        exact: torch.Tensor | None = None) -> float:
    """The Kendall tau a perfect predictor could reach against accuracies measured on ``n_eval`` examples.

    A label is a binomial estimate of the model's expected accuracy, so even a predictor that knows every
    expected accuracy ranks the measured labels imperfectly when many models have nearly equal accuracy.
    The measured labels stand in for the expected accuracies; each draw re-measures them binomially and
    scores them against the originals. Returns the mean tau.
    ``exact`` marks labels without sampling noise between models: a model that predicts one class for every
    input (a collapsed zoo member) scores that class's frequency in the shared test subset, the same for
    every such model, so those are kept as measured (re-drawing them would invent noise and understate the
    ceiling).
    """
    p = accuracies.detach().double().flatten()
    if n_eval < 1 or not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"need accuracies in [0, 1] and n_eval >= 1, got n_eval={n_eval}")
    keep = torch.zeros_like(p, dtype=torch.bool) if exact is None else exact.flatten().bool()
    if keep.shape != p.shape:
        raise ValueError(f"exact has {keep.numel()} entries for {p.numel()} accuracies")
    gen = torch.Generator().manual_seed(seed)
    counts = torch.full_like(p, float(n_eval))

    def measured() -> torch.Tensor:
        return torch.where(keep, p, torch.binomial(counts, p, generator=gen) / n_eval)

    return sum(kendall_tau(p, measured()) for _ in range(draws)) / draws
