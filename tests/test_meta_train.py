"""Meta-training: it learns (parameters move, the shipped format is written), resumes, and advances long
tasks without meta-gradient steps past ``dense_steps``."""

from __future__ import annotations

import json

import torch

from nfn_plugins.meta_train import MetaConfig, meta_train
from nfn_plugins.optim import LearnedUpdate


def _tiny(**kw) -> MetaConfig:
    base = dict(minutes=5.0, max_truncations=2, unroll=2, task_steps=(4, 4), widths=(8,), heads=(2,), depths=(1,),
                batch_size=8, train_subset=256, channels=2, hidden=4, checkpoint_every=1)
    return MetaConfig(**{**base, **kw})


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_meta_train_learns_and_resumes(tmp_path):
    first = meta_train(tmp_path, _tiny(), progress=False)
    assert float(first.gain.abs().max()) > 0  # a fresh update has gain exactly 0: meta-gradients moved it
    saved = LearnedUpdate.from_pretrained(tmp_path / "learned")
    assert saved.meta["truncations"] == 2
    resumed = meta_train(tmp_path, _tiny(max_truncations=3), progress=False)  # resumes at 2, does one more
    assert [r["truncation"] for r in _log(tmp_path)] == [1, 2, 3]
    assert not torch.equal(resumed.gain, first.gain)


def test_long_tasks_advance_without_meta_steps(tmp_path):
    # 12-step tasks in truncations of 2: steps 0-3 dense (2 meta steps), then 1 in 2 of the other 4 truncations
    meta_train(tmp_path, _tiny(max_truncations=4, task_steps=(12, 12), dense_steps=4, sparse_every=2), progress=False)
    assert [r["task_step"] for r in _log(tmp_path)] == [2, 4, 6, 10]
