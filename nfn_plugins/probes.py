"""Probe features: learned inputs run through each weighed network's own forward pass.

Outputs on fixed inputs are unchanged by every function-preserving symmetry of the weights, the weight-space
group and the symmetries the NFN does not build in alike (MLP-unit scales; the paper model's per-block stream
permutations), so features read off them are exactly invariant. The inputs are parameters trained with the
predictor, started from uniform noise: the predictor sees no example of the task, only the weights (probing, as
in ProbeGen, Kahana et al. 2024). One `ProbeFeatures` runs one architecture, given by the zoo's ``arch`` dict;
image models only (text models take token ids, which cannot be learned by gradient).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

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


class ProbeFeatures(nn.Module):
    """[B] weight spaces of one architecture -> [B, out_dim] invariant features: each network's log-softmax and
    softmax on ``n_probes`` learned images."""

    def __init__(self, arch: dict, n_probes: int, seed: int = 0):
        super().__init__()
        from .zoo.models import build_model, unwrap
        from .zoo.family import zoo_binding

        if n_probes < 1:
            raise ValueError(f"n_probes must be >= 1, got {n_probes}")
        self.arch = dict(arch)
        model = build_model(self.arch).eval()
        shape = _image_shape(model)
        self._model = [model]  # a list: the template's own parameters are never trained or saved
        self._binding = zoo_binding(model)
        self._prefix = "model." if unwrap(model) is not model else ""  # HF models sit inside HFClassifier
        covered = {h.name for h, _ in self._binding.to_parameters(self._binding.read())}
        missing = sorted(n for n, _ in unwrap(model).named_parameters() if n not in covered)
        if missing:  # the forward would silently use the template's random values for them
            raise ValueError(f"the weight space of {self.arch} lacks parameters {missing}; probes cannot run it")
        with torch.no_grad():
            self.n_classes = model(torch.zeros(1, *shape)).shape[-1]
        self.probes = nn.Parameter(torch.rand(n_probes, *shape, generator=torch.Generator().manual_seed(seed)))
        self.out_dim = 2 * n_probes * self.n_classes

    @property
    def spec(self):
        return self._binding.spec

    def logits(self, ws: WeightSpace) -> torch.Tensor:
        """[B, n_probes, n_classes]: each network's logits on the probes (weights with batch dims [B])."""
        if ws.spec != self.spec:
            raise ValueError(f"these probe features run {self.spec.family} weights of architecture {self.arch}; "
                             f"got weights of another architecture ({ws.spec.family})")
        if len(ws.batch_shape) != 1:
            raise ValueError(f"expected weights with one batch dim, got batch shape {ws.batch_shape}")
        model, spec, probes = self._model[0], ws.spec, self.probes.to(ws[ws.spec.names[0]].dtype)

        def run(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            params = {self._prefix + h.name: x for h, x in self._binding.to_parameters(WeightSpace(spec, tensors))}
            return functional_call(model, params, (probes,))

        return vmap(run)(ws.tensors)

    def forward(self, ws: WeightSpace) -> torch.Tensor:
        logits = self.logits(ws)
        # log-probabilities carry a confident model's margins; probabilities its decisions (log-probs clamped:
        # a saturated softmax gives -1e3 and would dominate the head)
        return torch.cat([logits.log_softmax(-1).clamp_min(-20).flatten(1) / 10, logits.softmax(-1).flatten(1)], -1)
