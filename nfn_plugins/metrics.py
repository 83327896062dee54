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
