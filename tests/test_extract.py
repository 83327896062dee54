"""`extract_weights` / `load_weights`: bit-exact round trips, the canonical layout (checked by recomputing
attention and MLP outputs from the canonical tensors), PEFT / DDP / compile / accelerate wrappers, errors."""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
from torch import nn

from model_factories import ALL_FACTORIES, EXPECTED_FAMILY, MLP_KIND, RMS_NORM, build, extra_axes, model_output, rel_err
from nfn_plugins import BLOCK_AXES, WeightSpace, extract_weights, families, load_weights
from nfn_plugins.extract import bind

pytestmark = pytest.mark.usefixtures("exact_float64", "single_thread")

NAMES = list(ALL_FACTORIES)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys()
    changed = [k for k in snap if not torch.equal(now[k], snap[k])]
    assert not changed, f"entries changed: {changed[:5]}"


# -- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bit_exact(name):
    model, _ = build(name)
    ex = extra_axes(name)
    snap = _snapshot(model)
    ws = extract_weights(model, ex)
    assert ws.batch_shape == () and ws.dtype == torch.float64 and ws.spec.family == EXPECTED_FAMILY[name]
    # every parameter the model computes with appears exactly once (tied weights once)
    assert ws.numel() == sum(p.numel() for p in model.parameters())
    load_weights(model, ws, ex)
    _assert_state_equal(model, snap)
    again = extract_weights(model, ex)
    assert all(torch.equal(again[n], ws[n]) for n in ws.spec.names)
    # loading into a differently initialised model reproduces every state_dict entry of the source
    other, _ = build(name, seed=1)
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in snap.items())
    load_weights(other, ws, ex)
    _assert_state_equal(other, snap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_in_other_dtypes(dtype):
    model, _ = build("llama_untied")
    model = model.to(dtype)
    snap = _snapshot(model)
    ws = extract_weights(model)
    assert ws.dtype == dtype
    load_weights(model, ws)
    _assert_state_equal(model, snap)
    with pytest.raises(ValueError, match="ws.to"):
        load_weights(model, ws.double())
    _assert_state_equal(model, snap)


def test_minilm_round_trip_is_bit_exact(minilm):
    model, _, ws = minilm
    snap = _snapshot(model)
    fresh = extract_weights(model)
    assert all(torch.equal(fresh[n], ws[n]) for n in ws.spec.names)
    load_weights(model, fresh)
    _assert_state_equal(model, snap)
    s = ws.spec
    assert (s.family, s.n_blocks, s.d_model, s.n_heads, s.head_dim_qk, s.mlp_width) == ("bert", 6, 384, 12, 32, 1536)
    assert ws.numel() == sum(p.numel() for p in model.parameters())


def test_extracted_tensors_are_copies():
    model, _ = build("bert")
    snap = _snapshot(model)
    ws = extract_weights(model)
    blocks = bind(model).read(blocks_only=True)  # what an optimizer step reads: the block tensors alone
    assert set(blocks) == {n for n in ws.spec.names if n in BLOCK_AXES} and len(blocks) < len(ws.spec.names)
    assert all(torch.equal(x, ws[n]) for n, x in blocks.items())
    for t in [*ws.tensors.values(), *blocks.values()]:
        assert not t.requires_grad
        t.add_(1.0)
    _assert_state_equal(model, snap)


@pytest.mark.parametrize("name", NAMES)
def test_spec_describes_the_model(name):
    model, _ = build(name)
    s = extract_weights(model, extra_axes(name)).spec
    cfg = getattr(model, "config", None)
    if name.startswith("torch"):
        n_heads = n_kv = 4
        d, width = 16, 32
    else:
        d = cfg.hidden_size
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        width = 64 if name.startswith("gpt2") else cfg.intermediate_size
    assert (s.d_model, s.n_heads, s.n_kv_heads, s.head_dim_qk, s.head_dim_vo, s.mlp_width, s.n_blocks) == (
        d, n_heads, n_kv, d // n_heads, d // n_heads, width, 2)
    kind = MLP_KIND[name]
    assert s.gated_mlp == (kind == "gated")
    assert s.mlp_scale == {"gelu": "none", "relu": "positive", "gated": "nonzero"}[kind]
    assert s.rotary == s.stream_signs == (name in RMS_NORM)
    for t in s.tensors:
        assert t.ndim == len(t.axes) + t.block
        if t.block:
            assert t.shape[0] == s.n_blocks
        sizes = t.shape[1:] if t.block else t.shape
        assert all(a is None or n == s.axis_size(a) for a, n in zip(t.axes, sizes)), t


# -- canonical layout --------------------------------------------------------------------------------
def test_bert_canonical_layout():
    model, _ = build("bert")
    ws = extract_weights(model)
    L, H, D, dk = 2, 4, 16, 4
    shapes = {"q": (L, H, D, dk), "k": (L, H, D, dk), "v": (L, H, D, dk), "o": (L, H, dk, D), "q_bias": (L, H, dk),
              "k_bias": (L, H, dk), "v_bias": (L, H, dk), "o_bias": (L, D), "up": (L, D, 32), "up_bias": (L, 32),
              "down": (L, 32, D), "down_bias": (L, D), "norm1_weight": (L, D), "norm1_bias": (L, D),
              "norm2_weight": (L, D), "norm2_bias": (L, D)}
    for n, shape in shapes.items():
        assert tuple(ws[n].shape) == shape, n
        assert ws.spec[n].axes == BLOCK_AXES[n]
    for l, layer in enumerate(model.bert.encoder.layer):
        att = layer.attention
        for h in range(H):
            sl = slice(h * dk, (h + 1) * dk)
            assert torch.equal(ws["q"][l, h], att.self.query.weight.T[:, sl])
            assert torch.equal(ws["k"][l, h], att.self.key.weight.T[:, sl])
            assert torch.equal(ws["v"][l, h], att.self.value.weight.T[:, sl])
            assert torch.equal(ws["o"][l, h], att.output.dense.weight.T[sl, :])
            assert torch.equal(ws["q_bias"][l, h], att.self.query.bias[sl])
            assert torch.equal(ws["v_bias"][l, h], att.self.value.bias[sl])
        assert torch.equal(ws["up"][l], layer.intermediate.dense.weight.T)
        assert torch.equal(ws["down"][l], layer.output.dense.weight.T)
        assert torch.equal(ws["norm1_weight"][l], att.output.LayerNorm.weight)
        assert torch.equal(ws["norm2_bias"][l], layer.output.LayerNorm.bias)
    assert torch.equal(ws["bert.embeddings.word_embeddings.weight"], model.bert.embeddings.word_embeddings.weight)


def test_gpt2_fused_c_attn_split():
    model, _ = build("gpt2_lm")
    ws = extract_weights(model)
    D, H, dk = 16, 4, 4
    for l, block in enumerate(model.transformer.h):
        w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: [in, 3D]
        assert w.shape == (D, 3 * D)
        for i, n in enumerate("qkv"):
            part = w[:, i * D:(i + 1) * D]
            assert torch.equal(ws[n][l], part.reshape(D, H, dk).permute(1, 0, 2))
            assert torch.equal(ws[f"{n}_bias"][l], b[i * D:(i + 1) * D].reshape(H, dk))
        assert torch.equal(ws["o"][l], block.attn.c_proj.weight.reshape(H, dk, D))
        assert torch.equal(ws["up"][l], block.mlp.c_fc.weight) and torch.equal(ws["down"][l], block.mlp.c_proj.weight)
    names = set(ws.spec.names)
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names  # tied: stored once


def test_torch_in_proj_split():
    model, _ = build("torch_pre_relu")
    ws = extract_weights(model, extra_axes("torch_pre_relu"))
    D, H, dk = 16, 4, 4
    for l, layer in enumerate(model.encoder.layers):
        w, b = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias  # [3D, D] rows q, k, v
        for i, n in enumerate("qkv"):
            assert torch.equal(ws[n][l], w[i * D:(i + 1) * D].T.reshape(D, H, dk).permute(1, 0, 2))
            assert torch.equal(ws[f"{n}_bias"][l], b[i * D:(i + 1) * D].reshape(H, dk))
        assert torch.equal(ws["o"][l], layer.self_attn.out_proj.weight.T.reshape(H, dk, D))
        assert torch.equal(ws["norm1_weight"][l], layer.norm1.weight)


def test_llama_gqa_layout():
    model, _ = build("llama_untied")
    ws = extract_weights(model)
    L, H, Hkv, D, dk, A = 2, 4, 2, 32, 8, 48
    assert ws["q"].shape == (L, H, D, dk) and ws["k"].shape == (L, Hkv, D, dk) and ws["v"].shape == (L, Hkv, D, dk)
    assert ws["o"].shape == (L, H, dk, D) and ws["gate"].shape == (L, D, A) and ws["down"].shape == (L, A, D)
    assert "q_bias" not in ws and "norm1_bias" not in ws
    attn = model.model.layers[1].self_attn
    assert torch.equal(ws["k"][1, 1], attn.k_proj.weight.T[:, dk:2 * dk])
    assert torch.equal(ws["o"][1, 3], attn.o_proj.weight.T[3 * dk:, :])
    assert torch.equal(ws["lm_head.weight"], model.lm_head.weight)


# Module paths (block l) for the attention / MLP recomputation below.
_PATHS = {
    "bert": ("bert.encoder.layer.{l}", "attention.self.query", "attention.output.dense", "intermediate.dense",
             "output.dense", "intermediate.intermediate_act_fn"),
    "roberta": ("roberta.encoder.layer.{l}", "attention.self.query", "attention.output.dense", "intermediate.dense",
                "output.dense", "intermediate.intermediate_act_fn"),
    "vit": ("vit.layers.{l}", "attention.q_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2", "mlp.activation_fn"),
    "gpt2_lm": ("transformer.h.{l}", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "mlp.act"),
    **{n: ("model.layers.{l}", "self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj", "mlp.act_fn")
       for n in ("llama_untied", "qwen2", "mistral")},
}


def _attention_from_canonical(ws, l, x, key_mask, causal, window=None, rope=None):
    """o-projection output of block l, computed only from canonical tensors (right-multiplication form)."""
    s = ws.spec
    q = torch.einsum("btd,hde->bhte", x, ws["q"][l])
    k = torch.einsum("btd,hde->bhte", x, ws["k"][l])
    v = torch.einsum("btd,hde->bhte", x, ws["v"][l])
    if "q_bias" in ws:
        q, k, v = (t + ws[f"{n}_bias"][l][None, :, None, :] for t, n in ((q, "q"), (k, "k"), (v, "v")))
    if rope is not None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q, k, *rope)
    k = k.repeat_interleave(s.group_size, dim=1)  # query head h reads key-value head h // group_size
    v = v.repeat_interleave(s.group_size, dim=1)
    scores = q @ k.transpose(-1, -2) / s.head_dim_qk ** 0.5
    T = x.shape[1]
    allowed = key_mask[:, None, None, :].bool().expand(-1, 1, T, T)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    if causal:
        allowed = allowed & (j <= i)
    if window is not None:
        allowed = allowed & (i - j < window)
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    y = torch.einsum("bhts,bhse->bhte", p, v)
    out = torch.einsum("bhte,hed->btd", y, ws["o"][l])
    return out + ws["o_bias"][l] if "o_bias" in ws else out


@pytest.mark.parametrize("name", list(_PATHS))
def test_canonical_tensors_compute_the_models_attention_and_mlp(name):
    model, make_inputs = build(name)
    ws = extract_weights(model)
    inputs = make_inputs(0)
    block, q_in, o_out, mlp_in, mlp_out, act_path = _PATHS[name]
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for l in range(ws.spec.n_blocks):
        prefix = block.format(l=l)
        for key, path, kind in ((f"x{l}", q_in, "in"), (f"o{l}", o_out, "out"), (f"m{l}", mlp_in, "in"),
                                (f"d{l}", mlp_out, "out")):
            mod = model.get_submodule(f"{prefix}.{path}")
            if kind == "in":
                hooks.append(mod.register_forward_pre_hook(lambda m, a, key=key: captured.__setitem__(key, a[0])))
            else:
                hooks.append(mod.register_forward_hook(lambda m, a, out, key=key: captured.__setitem__(key, out)))
    model_output(model, inputs)
    for h in hooks:
        h.remove()
    T = captured["x0"].shape[1]
    key_mask = inputs.get("attention_mask", torch.ones(captured["x0"].shape[0], T, dtype=torch.long))
    causal = name in ("gpt2_lm", "llama_untied", "qwen2", "mistral")
    rope = None
    for l in range(ws.spec.n_blocks):
        x = captured[f"x{l}"]
        if name in RMS_NORM:
            rope = model.model.rotary_emb(x, torch.arange(T)[None])
        window = model.config.sliding_window if name == "mistral" else None
        out = _attention_from_canonical(ws, l, x, key_mask, causal, window, rope)
        assert rel_err(out, captured[f"o{l}"]) < 1e-12, f"block {l} attention"
        act = model.get_submodule(f"{block.format(l=l)}.{act_path}")
        m = captured[f"m{l}"]
        if "gate" in ws:
            hidden = act(m @ ws["gate"][l]) * (m @ ws["up"][l])
        else:
            hidden = act(m @ ws["up"][l] + ws["up_bias"][l])
        down = hidden @ ws["down"][l] + (ws["down_bias"][l] if "down_bias" in ws else 0)
        assert rel_err(down, captured[f"d{l}"]) < 1e-12, f"block {l} MLP"


@pytest.mark.parametrize("name", ["torch_post_relu", "torch_pre_gelu"])
def test_torch_attention_from_canonical(name):
    model, make_inputs = build(name)
    ws = extract_weights(model, extra_axes(name))
    x = model.embed(make_inputs(0)["input_ids"])
    for l, layer in enumerate(model.encoder.layers):
        with torch.no_grad():
            ref, _ = layer.self_attn(x, x, x, need_weights=False)
        out = _attention_from_canonical(ws, l, x, torch.ones(x.shape[:2]), causal=False)
        assert rel_err(out, ref) < 1e-12
        with torch.no_grad():
            mlp = layer.linear2(layer.activation(layer.linear1(x)))
        hidden = layer.activation(x @ ws["up"][l] + ws["up_bias"][l])
        assert rel_err(hidden @ ws["down"][l] + ws["down_bias"][l], mlp) < 1e-12


# -- PEFT --------------------------------------------------------------------------------------------
LORA_TARGETS = {"bert": ["query", "value", "intermediate.dense"], "gpt2_lm": ["c_attn", "c_proj"],
                "llama_untied": ["q_proj", "k_proj", "down_proj"]}


def _randomize_lora_b(pm: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("name", list(LORA_TARGETS))
def test_lora_effective_weights(name):
    model, make_inputs = build(name)
    base = extract_weights(model)
    config = peft.LoraConfig(r=2, target_modules=LORA_TARGETS[name], lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    zero = extract_weights(pm)  # B = 0 at init: the effective weights are the base weights
    assert zero.spec == base.spec
    assert all(torch.equal(zero[n], base[n]) for n in base.spec.names)

    _randomize_lora_b(pm)
    eff = extract_weights(pm)
    changed = [n for n in base.spec.names if not torch.equal(eff[n], base[n])]
    assert changed and set(changed) <= {"q", "k", "v", "o", "up", "down"}
    merged = extract_weights(copy.deepcopy(pm).merge_and_unload())
    assert max(rel_err(eff[n], merged[n]) for n in base.spec.names) < 1e-14
    # the effective weights compute what the PEFT model computes
    inputs = make_inputs(0)
    y_peft = model_output(pm, inputs)
    load_weights(model, eff)
    assert rel_err(model_output(model, inputs), y_peft) < 1e-12

    # writing into a model with active non-zero deltas is refused, and nothing is written
    snap = _snapshot(pm)
    with pytest.raises(ValueError, match=r"LoRA.*merge_and_unload") as err:
        load_weights(pm, base)
    assert re.search(r"(attention\.self\.query|attn\.c_attn|self_attn\.q_proj) \((Linear|Conv1D)\)", str(err.value))
    _assert_state_equal(pm, snap)

    # with the adapters disabled, the base weights are read
    with pm.disable_adapter():
        off = extract_weights(pm)
    assert all(torch.equal(off[n], base[n]) for n in base.spec.names)


LORA_GAPS = {  # adapter variants that must be read faithfully or refused, never silently dropped
    "embedding": ("bert", dict(target_modules=["word_embeddings"]), "LoRA embedding: read as base + delta"),
    "tied_head": ("gpt2_lm", dict(target_modules=["lm_head"]), "LoRA on a tied head: refused (not representable)"),
    "dora": ("bert", dict(target_modules=["query"], use_dora=True), "DoRA: refused (not base + B A)"),
    "lora_bias": ("bert", dict(target_modules=["query"], lora_bias=True), "lora_bias: refused (changes the bias)"),
}


@pytest.mark.parametrize("case", list(LORA_GAPS))
def test_adapted_models_are_read_faithfully_or_refused(case):
    """Never silently wrong: either extract_weights raises, or the weights it returns compute the PEFT model."""
    name, cfg, _ = LORA_GAPS[case]
    model, make_inputs = build(name)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_dropout=0.0, **cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n and "magnitude" not in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    inputs = make_inputs(0)
    y_peft = model_output(pm, inputs)
    assert rel_err(y_peft, model_output(model, inputs)) > 1e-3  # the adapter does change the function
    try:
        ws = extract_weights(pm)
    except ValueError:
        return
    load_weights(model, ws)
    assert rel_err(model_output(model, inputs), y_peft) < 1e-10


def test_lora_zero_delta_round_trip_and_symmetry():
    model, make_inputs = build("bert")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query", "value"], lora_dropout=0.0))
    snap = _snapshot(pm)
    ws = extract_weights(pm)
    load_weights(pm, ws)
    _assert_state_equal(pm, snap)
    from nfn_plugins import SymmetryGroup

    inputs = make_inputs(0)
    y = model_output(pm, inputs)
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(0))
    load_weights(pm, g.act(ws))  # zero delta: writing the base weight is unambiguous
    assert rel_err(model_output(pm, inputs), y) < 1e-8
    assert not torch.equal(pm.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight,
                           snap["base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"])


def test_modules_to_save_reads_and_writes_the_active_copy():
    model, make_inputs = build("gpt2_cls")  # its head `score` reads the stream
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["score"],
                                                    lora_dropout=0.0))
    wrapper = pm.base_model.model.score
    active = wrapper.modules_to_save["default"]
    with torch.no_grad():
        active.weight.mul_(2.0)  # the copy now differs from the original module
    ws = extract_weights(pm)
    assert "score.weight" in ws.spec.names
    assert torch.equal(ws["score.weight"], active.weight)
    assert not torch.equal(ws["score.weight"], wrapper.original_module.weight)
    from nfn_plugins import SymmetryGroup

    inputs = make_inputs(0)
    y = model_output(pm, inputs)
    original = wrapper.original_module.weight.detach().clone()
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(0))
    load_weights(pm, g.act(ws))  # must permute the active copy's stream axis, or the output would change
    assert rel_err(model_output(pm, inputs), y) < 1e-8
    assert torch.equal(wrapper.original_module.weight, original)


# -- training wrappers --------------------------------------------------------------------------------
def _check_wrapped(wrapped: nn.Module, model: nn.Module, ex=None) -> None:
    ref = extract_weights(model, ex)
    ws = extract_weights(wrapped, ex)
    assert ws.spec == ref.spec and all(torch.equal(ws[n], ref[n]) for n in ref.spec.names)
    load_weights(wrapped, ws.map(lambda x: x * 2), ex)  # writes reach the user's model
    assert torch.equal(extract_weights(model, ex)["q"], ref["q"] * 2)
    load_weights(wrapped, ref, ex)


def test_ddp_wrapper(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model, _ = build("bert")
        ddp = nn.parallel.DistributedDataParallel(model)
        _check_wrapped(ddp, model)
        _check_wrapped(torch.compile(ddp), model)  # wrappers nest
    finally:
        dist.destroy_process_group()


def test_torch_compile_wrapper():
    model, _ = build("torch_pre_gelu")
    compiled = torch.compile(model)  # not run: only the `_orig_mod` unwrapping is under test
    assert compiled._orig_mod is model
    _check_wrapped(compiled, model, extra_axes("torch_pre_gelu"))


def test_accelerate_prepare():
    accelerate = pytest.importorskip("accelerate")
    model, make_inputs = build("llama_untied")
    acc = accelerate.Accelerator(cpu=True)
    try:
        prepared = acc.prepare(model)
        _check_wrapped(prepared, model)
        ws = extract_weights(prepared)
        assert rel_err(model_output(prepared, make_inputs(0)), model_output(model, make_inputs(0))) == 0
        assert ws.spec.family == "llama"
    finally:
        acc.free_memory()


# -- errors ------------------------------------------------------------------------------------------
def _family_names_in(msg: str) -> bool:
    return all(f"{f.name}:" in msg for f in families.FAMILIES)


def test_unsupported_model_is_rejected_with_the_supported_families():
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError) as err:
        extract_weights(mlp)
    msg = str(err.value)
    assert "Sequential" in msg and "no supported stack of transformer blocks" in msg and _family_names_in(msg)

    class Blocks(nn.Module):  # a ModuleList of the wrong kind of block
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    with pytest.raises(ValueError) as err:
        extract_weights(Blocks())
    assert "layers (Linear x2)" in str(err.value) and _family_names_in(str(err.value))


def _qwen3():
    tr = pytest.importorskip("transformers")
    if not hasattr(tr, "Qwen3ForCausalLM"):
        pytest.skip("this transformers has no Qwen3")
    cfg = tr.Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return tr.Qwen3ForCausalLM._from_config(cfg, attn_implementation="eager")


def _bert_with_stray_param():
    model, _ = build("bert")
    model.extra_head = nn.Linear(16, 3).double()
    return model


def test_qwen3_qk_norm_is_rejected():
    with pytest.raises(ValueError) as err:
        extract_weights(_qwen3())
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_norm" in msg and "Qwen3RMSNorm" in msg and "not supported" in msg


def test_unknown_outer_parameter_is_rejected():
    with pytest.raises(ValueError) as err:
        extract_weights(_bert_with_stray_param())
    msg = str(err.value)
    assert "extra_head.weight in extra_head (Linear)" in msg and "extra_axes=" in msg




@pytest.mark.parametrize("make", [_qwen3, _bert_with_stray_param], ids=["qwen3_qk_norm", "unknown_outer"])
def test_every_unsupported_model_error_lists_the_supported_families(make):
    with pytest.raises(ValueError) as err:
        extract_weights(make())
    assert _family_names_in(str(err.value))


def test_torch_encoder_needs_extra_axes_and_checks_them():
    model, _ = build("torch_post_relu")
    with pytest.raises(ValueError, match=r"embed\.weight in embed \(Embedding\)"):
        extract_weights(model)
    bad = dict(extra_axes("torch_post_relu"), **{"embed.weight": ("embed", ("stream", None))})  # axes swapped
    with pytest.raises(ValueError, match=r"embed\.weight: axes .* do not fit its shape \(50, 16\)"):
        extract_weights(model, bad)


def _last_planned_outer(ws: WeightSpace) -> str:
    return [t.name for t in ws.spec.tensors if not t.block][-1]


@pytest.mark.parametrize("target", ["first_block", "last_outer"])
def test_load_with_wrong_dtype_writes_nothing(target):
    model, _ = build("bert")
    ws = extract_weights(model)
    snap = _snapshot(model)
    new = ws.map(lambda x: x + 1.0)  # would change every parameter
    name = "q" if target == "first_block" else _last_planned_outer(ws)
    tensors = dict(new.tensors)
    tensors[name] = tensors[name].float()
    with pytest.raises(ValueError, match=r"torch\.float32.*ws\.to\(dtype\)"):
        load_weights(model, WeightSpace(ws.spec, tensors))
    _assert_state_equal(model, snap)
    with pytest.raises(ValueError):
        load_weights(model, new.to(torch.float32))
    _assert_state_equal(model, snap)


@pytest.mark.parametrize("target", ["first_block", "last_outer"])
def test_load_with_wrong_shape_writes_nothing(target):
    model, _ = build("gpt2_cls")
    ws = extract_weights(model)
    snap = _snapshot(model)
    new = ws.map(lambda x: x + 1.0)
    name = "q" if target == "first_block" else _last_planned_outer(ws)
    new.tensors[name] = torch.cat([new.tensors[name], new.tensors[name][..., :1]], dim=-1)  # bypasses validation
    with pytest.raises(ValueError, match="weight space gives"):
        load_weights(model, new)
    _assert_state_equal(model, snap)


def test_load_from_another_architecture_is_refused():
    model, _ = build("bert")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_weights(model, extract_weights(build("gpt2_lm")[0]))
    from transformers import BertConfig, BertForSequenceClassification

    wider = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=32,
                                                     max_position_embeddings=16, num_labels=3)).double()
    with pytest.raises(ValueError, match="d_model: 32 vs model 16"):
        load_weights(model, extract_weights(wider))
    _assert_state_equal(model, snap)


def test_load_refuses_batch_dims():
    model, _ = build("llama_tied")
    ws = extract_weights(model)
    snap = _snapshot(model)
    for batched in (ws.unsqueeze(0), WeightSpace.stack([ws, ws])):
        with pytest.raises(ValueError, match="batch shape"):
            load_weights(model, batched)
    _assert_state_equal(model, snap)
