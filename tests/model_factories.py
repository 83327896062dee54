"""Small float64 models of every supported family, re-randomised so that symmetry tests can fail.

Hugging Face initialises weights with std 0.02, which makes attention nearly uniform and the MLPs nearly
linear; breaking a symmetry might then change the outputs by less than any sensible threshold and a
test meant to detect it could not fail. Every factory therefore re-draws all parameters at a larger
scale (matrices ~ 1.5 N(0, 1/fan_in), embeddings ~ N(0, 1), norm gains ~ 1 + 0.3 N, biases ~ 0.3 N).

Each factory returns ``(model, make_inputs)``: an ``.eval()`` float64 model with eager attention and a
function ``make_inputs(seed) -> dict`` of forward kwargs. ``model_output(model, inputs)`` returns an
output that the symmetry group leaves invariant (logits / pooled outputs, never hidden states, which
live in stream coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

VOCAB = 50
SEQ = 7
BATCH = 2

Factory = Callable[[int], tuple[nn.Module, Callable[[int], dict]]]


# -- helpers -------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative (Frobenius) difference of two outputs."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def model_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.pooler_output


@torch.no_grad()
def rerandomize(model: nn.Module, seed: int, scale: float = 1.5) -> nn.Module:
    """Re-draw every parameter (see module docstring). Tied parameters are drawn once."""
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = lambda: torch.randn(p.shape, generator=g, dtype=torch.float64)  # noqa: E731
            if isinstance(module, nn.Embedding) or (p.dim() >= 2 and "embed" in pname) or p.dim() == 3:
                value = n()  # embeddings, cls token, ViT position embeddings
            elif p.dim() == 1:
                value = 0.3 * n() if pname.endswith("bias") else 1 + 0.3 * n()
            else:
                # nn.Linear / conv / in_proj store [out, in, ...]; transformers' Conv1D (GPT-2) stores [in, out].
                fan_in = p.shape[0] if type(module).__name__ == "Conv1D" else p[0].numel()
                value = scale * n() / math.sqrt(fan_in)
            p.copy_(value.to(p.dtype))
    return model


def _finish(model: nn.Module, seed: int) -> nn.Module:
    model = model.to(torch.float64)
    rerandomize(model, seed)
    return model.eval()


def _token_inputs(with_mask: bool = True, type_ids: bool = False, low: int = 2) -> Callable[[int], dict]:
    def make(seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(10_000 + seed)
        ids = torch.randint(low, VOCAB, (BATCH, SEQ), generator=g)
        out: dict = {"input_ids": ids}
        if with_mask:
            mask = torch.ones(BATCH, SEQ, dtype=torch.long)
            mask[1, -2:] = 0  # a padded sequence: masks take part too
            out["attention_mask"] = mask
        if type_ids:
            out["token_type_ids"] = (torch.arange(SEQ) >= SEQ // 2).long().expand(BATCH, SEQ).clone()
        return out

    return make


def _hf(cls, config) -> nn.Module:
    return cls._from_config(config, attn_implementation="eager")


# -- BERT family -----------------------------------------------------------------------------------
def make_bert(seed: int = 0, hidden_act: str = "gelu"):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=16, type_vocab_size=2, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_act=hidden_act)
    return _finish(_hf(BertForSequenceClassification, cfg), seed), _token_inputs(type_ids=True)


def make_bert_relu(seed: int = 0):
    """BERT with hidden_act="relu" given as a config string (positive MLP scales become symmetries)."""
    return make_bert(seed, hidden_act="relu")


def make_roberta(seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=SEQ + 4, type_vocab_size=1, num_labels=3,
                        pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _finish(_hf(RobertaForSequenceClassification, cfg), seed), _token_inputs()


# -- ViT ---------------------------------------------------------------------------------------------
def make_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=32, num_labels=3,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def make_inputs(seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(20_000 + seed)
        return {"pixel_values": torch.randn(BATCH, 1, 8, 8, generator=g, dtype=torch.float64)}

    return _finish(_hf(ViTForImageClassification, cfg), seed), make_inputs


# -- GPT-2 ---------------------------------------------------------------------------------------------
def _gpt2_config(**kw):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=4,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)


def make_gpt2_lm(seed: int = 0):
    from transformers import GPT2LMHeadModel

    model = _finish(_hf(GPT2LMHeadModel, _gpt2_config()), seed)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    return model, _token_inputs()


def make_gpt2_cls(seed: int = 0):
    from transformers import GPT2ForSequenceClassification

    cfg = _gpt2_config(num_labels=3, pad_token_id=0)
    return _finish(_hf(GPT2ForSequenceClassification, cfg), seed), _token_inputs(with_mask=False, low=1)


# -- Llama family -------------------------------------------------------------------------------------
def _llama_like(config_cls, model_cls, seed: int, **kw):
    cfg = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                     attention_dropout=0.0, **kw)
    return _finish(_hf(model_cls, cfg), seed), _token_inputs()


def make_llama_tied(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, inputs = _llama_like(LlamaConfig, LlamaForCausalLM, seed, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, inputs


def make_llama_untied(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, inputs = _llama_like(LlamaConfig, LlamaForCausalLM, seed, tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    return model, inputs


def make_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, inputs = _llama_like(Qwen2Config, Qwen2ForCausalLM, seed, tie_word_embeddings=False)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    return model, inputs


def make_mistral(seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    return _llama_like(MistralConfig, MistralForCausalLM, seed, tie_word_embeddings=False, sliding_window=4)


# -- torch nn.TransformerEncoder -----------------------------------------------------------------------
class TorchEncoderClassifier(nn.Module):
    """Token embedding -> nn.TransformerEncoder -> per-token linear head (logits are invariant)."""

    def __init__(self, d: int = 16, heads: int = 4, ff: int = 32, layers: int = 2, norm_first: bool = False,
                 activation: str = "relu", n_classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation=activation, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d, n_classes)

    def forward(self, input_ids: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids), src_key_padding_mask=src_key_padding_mask))


TORCH_EXTRA_AXES = {
    "embed.weight": ("embed", (None, "stream")),
    "head.weight": ("readout", (None, "stream")),
    "head.bias": ("free", (None,)),
}


def _make_torch(norm_first: bool, activation: str):
    def factory(seed: int = 0):
        def make_inputs(s: int = 0) -> dict:
            g = torch.Generator().manual_seed(30_000 + s)
            return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)}

        return _finish(TorchEncoderClassifier(norm_first=norm_first, activation=activation), seed), make_inputs

    return factory


# -- registry ---------------------------------------------------------------------------------------------
FACTORIES: dict[str, Factory] = {
    "bert": make_bert,
    "roberta": make_roberta,
    "vit": make_vit,
    "gpt2_lm": make_gpt2_lm,
    "gpt2_cls": make_gpt2_cls,
    "llama_tied": make_llama_tied,
    "llama_untied": make_llama_untied,
    "qwen2": make_qwen2,
    "mistral": make_mistral,
    "torch_post_relu": _make_torch(False, "relu"),
    "torch_post_gelu": _make_torch(False, "gelu"),
    "torch_pre_relu": _make_torch(True, "relu"),
    "torch_pre_gelu": _make_torch(True, "gelu"),
}

# Variants only this suite parametrizes over (other test modules iterate FACTORIES).
ALL_FACTORIES: dict[str, Factory] = {**FACTORIES, "bert_relu": make_bert_relu}

# Which library family each factory must bind to.
EXPECTED_FAMILY = {
    "bert": "bert", "bert_relu": "bert", "roberta": "bert", "vit": "vit", "gpt2_lm": "gpt2", "gpt2_cls": "gpt2",
    "llama_tied": "llama", "llama_untied": "llama", "qwen2": "llama", "mistral": "llama",
    "torch_post_relu": "torch", "torch_post_gelu": "torch", "torch_pre_relu": "torch", "torch_pre_gelu": "torch",
}


def extra_axes(name: str) -> dict | None:
    return dict(TORCH_EXTRA_AXES) if name.startswith("torch") else None


def build(name: str, seed: int = 0):
    return ALL_FACTORIES[name](seed)


# -- facts the tests expect, written down independently of the library's own classification ------------
MLP_KIND = {
    "bert": "gelu", "bert_relu": "relu", "roberta": "gelu", "vit": "gelu", "gpt2_lm": "gelu", "gpt2_cls": "gelu",
    "llama_tied": "gated", "llama_untied": "gated", "qwen2": "gated", "mistral": "gated",
    "torch_post_relu": "relu", "torch_post_gelu": "gelu", "torch_pre_relu": "relu", "torch_pre_gelu": "gelu",
}
RMS_NORM = {"llama_tied", "llama_untied", "qwen2", "mistral"}  # also: rotary positions, GQA (4 heads / 2 kv)


class Loaded:
    """A built model with its inputs, reference output, extracted weights and group."""

    def __init__(self, name: str, seed: int = 0):
        from nfn_plugins import SymmetryGroup, extract_weights

        self.name = name
        self.model, self.make_inputs = build(name, seed)
        self.inputs = self.make_inputs(0)
        self.extra = extra_axes(name)
        self.ws = extract_weights(self.model, self.extra)
        self.spec = self.ws.spec
        self.group = SymmetryGroup(self.spec)
        self.y = model_output(self.model, self.inputs)

    def output_with(self, ws) -> torch.Tensor:
        """The model's output with weights ``ws`` (the original weights are restored afterwards)."""
        from nfn_plugins import load_weights

        load_weights(self.model, ws, self.extra)
        try:
            return model_output(self.model, self.inputs)
        finally:
            load_weights(self.model, self.ws, self.extra)

    def change(self, ws) -> float:
        """Relative change of the invariant output when the model carries ``ws``."""
        return rel_err(self.output_with(ws), self.y)


def ws_rel_err(a, b) -> float:
    """Largest relative difference over the tensors of two weight spaces."""
    return max(rel_err(a[k], b[k]) for k in a.spec.names)
