"""Collapsed classifiers: a model that predicts one class for every input scores that class's frequency in
the test set, whatever else its weights say.

About half of the members of the mnist-paper and movies-bert zoos collapsed so, and at cut-off 0% the pairs
among them are a quarter of Kendall tau's pairs. Which class a collapsed member predicts is readable from its
output bias (its argmax picks it for 96% of them on mnist-paper); its score is then a per-class constant
that training labels give. The mixture

    accuracy = (1 - pi) * main + pi * class_accuracy[argmax of the output bias]

ranks them, with ``pi`` a gate trained on which training members collapsed (`Zoo.at_class_frequency`),
soft while training and a hard decision in eval mode.
It stays invariant: no symmetry of the weight space acts on the class axis (permuting the outputs changes
the function).
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import WeightSpaceSpec
from ..weight_space import WeightSpace
from .head import mlp


def output_bias_name(spec: WeightSpaceSpec, n_classes: int) -> str:
    """The classifier's output bias: the last tensor outside the blocks shaped ``(n_classes,)``."""
    names = [t.name for t in spec.tensors if not t.block and t.role == "free" and tuple(t.shape) == (n_classes,)]
    if not names:
        raise ValueError(f"{spec.family} weights have no output bias of {n_classes} classes (a free vector outside "
                         f"the blocks); a collapse head reads one: use n_classes=0 for models without it")
    return names[-1]


def output_bias(ws: WeightSpace, n_classes: int) -> torch.Tensor:
    """[N, n_classes]: the output biases of a batch of weight spaces (batch and channel dims flattened)."""
    bias = ws[output_bias_name(ws.spec, n_classes)]
    return bias.reshape(-1, n_classes)


@torch.no_grad()
def class_accuracies(bias: torch.Tensor, labels: torch.Tensor, collapsed: torch.Tensor) -> torch.Tensor:
    """Each class's score when a model predicts only it: the mean label of the collapsed training members
    whose output bias picks it (the mean over all collapsed ones for a class none picks; 1/classes if none)."""
    n_classes = bias.shape[-1]
    collapsed = collapsed.bool()
    fallback = labels[collapsed].mean() if collapsed.any() else torch.tensor(1.0 / n_classes)
    picks = bias.argmax(-1)
    return torch.stack([labels[collapsed & (picks == c)].mean() if (collapsed & (picks == c)).any() else fallback
                        for c in range(n_classes)]).float()


def mix_collapsed(main_accuracy: torch.Tensor, pi: torch.Tensor, bias: torch.Tensor,
                  class_accuracy: torch.Tensor) -> torch.Tensor:
    """(1 - pi) * main + pi * the score of the class the output bias picks."""
    return (1 - pi) * main_accuracy + pi * class_accuracy.to(main_accuracy)[bias.argmax(-1)]


class CollapseHead(nn.Module):
    """The gate and the per-class scores on top of a predictor's main head (see the module docstring)."""

    def __init__(self, feature_dim: int, n_classes: int, hidden: int = 32):
        super().__init__()
        self.n_classes = n_classes
        self.gate = mlp(feature_dim + n_classes, [hidden], 1)
        self.register_buffer("class_accuracy", torch.full((n_classes,), 1.0 / n_classes))

    def fit(self, bias: torch.Tensor, labels: torch.Tensor, collapsed: torch.Tensor) -> None:
        self.class_accuracy.copy_(class_accuracies(bias, labels, collapsed))

    def forward(self, features: torch.Tensor, bias: torch.Tensor, main_logit: torch.Tensor):
        """(mixed accuracy logit [B], gate logit [B]) from invariant features [B, F], output biases [B, K] and
        the main head's logit [B]."""
        b = bias.to(features)
        standardised = (b - b.mean(-1, keepdim=True)) / (b.std(-1, keepdim=True, correction=0) + 1e-6)
        gate = self.gate(torch.cat([features, standardised], -1)).squeeze(-1)
        # in eval mode the gate decides: class scores differ by ~0.005, so a soft gate's leak of the main
        # prediction reorders collapsed members (mnist-paper, one split: within-collapsed tau 0.39 soft, 0.68 hard)
        pi = torch.sigmoid(gate) if self.training else (gate > 0).to(features)
        accuracy = mix_collapsed(torch.sigmoid(main_logit), pi, b, self.class_accuracy)
        return torch.logit(accuracy, eps=1e-6), gate
