"""Probe features: learned inputs run through each weighed network's own forward pass.

Outputs on fixed inputs are unchanged by every function-preserving symmetry of the weights, the weight-space
group and the symmetries the NFN does not build in alike (MLP-unit scales; the paper model's per-block stream
permutations), so features read off them are exactly invariant. The inputs are parameters trained with the
predictor, started from uniform noise: the predictor sees no example of the task, only the weights (probing, as
in ProbeGen, Kahana et al. 2024). One `ProbeFeatures` runs the architectures given by a zoo's ``arch`` dicts, each
weight space through its own; image models only (text models take token ids, which cannot be learned by gradient).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from .extract import Binding
from .spec import WeightSpaceSpec
from .weight_space import WeightSpace


def _image_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of an image model built by `nfn_plugins.zoo.build_model`."""
    from .zoo.models import HFClassifier, PaperTransformer

    if isinstance(model, PaperTransformer) and model.config.modality == "image":
        cfg = model.config
        return cfg.channels, cfg.image_size, cfg.image_size
    if isinstance(model, HFClassifier) and not model.text:
        cfg = model.model.config
        return cfg.num_channels, cfg.image_size, cfg.image_size
    raise ValueError(f"probe features run image models (the paper's zoo transformer on images, ViT); got a "
                     f"{type(model).__name__} for text: token ids cannot be learned by gradient")


class _Runner(NamedTuple):
    """What runs one architecture's forward on a weight space: a template model and its zoo binding."""
    arch: dict
    model: nn.Module
    binding: Binding
    prefix: str  # HF models sit inside HFClassifier: their parameter names start with "model."


def _runner(arch: dict) -> tuple[_Runner, tuple[int, int, int]]:
    from .zoo.family import zoo_binding
    from .zoo.models import build_model, unwrap

    model = build_model(arch).eval()
    shape = _image_shape(model)
    binding = zoo_binding(model)
    covered = {h.name for h, _ in binding.to_parameters(binding.read())}
    missing = sorted(n for n, _ in unwrap(model).named_parameters() if n not in covered)
    if missing:  # the forward would silently use the template's random values for them
        raise ValueError(f"the weight space of {arch} lacks parameters {missing}; probes cannot run it")
    return _Runner(dict(arch), model, binding, "model." if unwrap(model) is not model else ""), shape


class ProbeFeatures(nn.Module):
    """[B] weight spaces of one of the architectures ``archs`` -> [B, out_dim] invariant features: each network's
    log-softmax and softmax on ``n_probes`` learned images. Several architectures (widths, depths) share the
    probes; they must take the same images and have the same classes."""

    def __init__(self, archs: dict | Sequence[dict], n_probes: int, seed: int = 0):
        super().__init__()
        if n_probes < 1:
            raise ValueError(f"n_probes must be >= 1, got {n_probes}")
        archs = [archs] if isinstance(archs, dict) else list(archs)
        if not archs:
            raise ValueError("probe features need at least one architecture (a zoo's arch dict)")
        self.archs = [dict(a) for a in archs]
        self._runners: dict[WeightSpaceSpec, _Runner] = {}  # templates: never trained or saved
        shapes, classes = set(), set()
        for arch in self.archs:
            runner, shape = _runner(arch)
            known = self._runners.get(runner.binding.spec)
            if known is not None and known.arch != runner.arch:
                raise ValueError(f"architectures {known.arch} and {runner.arch} have the same weight space: "
                                 "probes could not tell which forward to run")
            self._runners[runner.binding.spec] = runner
            with torch.no_grad():
                classes.add(runner.model(torch.zeros(1, *shape)).shape[-1])
            shapes.add(shape)
        if len(shapes) > 1 or len(classes) > 1:
            raise ValueError(f"architectures sharing probes must take the same images and have the same classes; "
                             f"got image shapes {sorted(shapes)} and class counts {sorted(classes)}")
        self.n_classes = classes.pop()
        self.probes = nn.Parameter(torch.rand(n_probes, *shapes.pop(), generator=torch.Generator().manual_seed(seed)))
        self.out_dim = 2 * n_probes * self.n_classes

    def logits(self, ws: WeightSpace) -> torch.Tensor:
        """[B, n_probes, n_classes]: each network's logits on the probes (weights with batch dims [B])."""
        runner = self._runners.get(ws.spec)
        if runner is None:
            raise ValueError(f"these probe features run the architectures {self.archs}; got {ws.spec.family} "
                             "weights of another architecture")
        if len(ws.batch_shape) != 1:
            raise ValueError(f"expected weights with one batch dim, got batch shape {ws.batch_shape}")
        spec, probes = ws.spec, self.probes.to(ws[ws.spec.names[0]].dtype)

        def run(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            params = {runner.prefix + h.name: x for h, x in runner.binding.to_parameters(WeightSpace(spec, tensors))}
            return functional_call(runner.model, params, (probes,))

        return vmap(run)(ws.tensors)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        logits = self.logits(ws)
        # log-probabilities carry a confident model's margins; probabilities its decisions (log-probs clamped:
        # a saturated softmax gives -1e3 and would dominate the head)
        return torch.cat([logits.log_softmax(-1).clamp_min(-20).flatten(1) / 10, logits.softmax(-1).flatten(1)], -1)
