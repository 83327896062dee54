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


def test_meta_training_from_a_validated_update_on_the_muon_base(tmp_path):
    """--init starts from an update's weights but not its validated lr / horizon / base step (they were chosen
    for it, not for what training makes of it); the base step meta-trained on is what the result reports."""
    init = meta_train(tmp_path / "a", _tiny(), progress=False)
    init.save_pretrained(tmp_path / "a" / "learned", recommended_lr=0.5, correction_horizon=7, base_direction="adam",
                         nesterov=False)
    out = meta_train(tmp_path / "b", _tiny(init=str(tmp_path / "a" / "learned"), base_direction="muon"), progress=False)
    saved = LearnedUpdate.from_pretrained(tmp_path / "b" / "learned")
    assert not {"recommended_lr", "correction_horizon", "base_direction", "nesterov"} & set(saved.meta)
    assert saved.base_direction == "muon" and saved.horizon == 4 and saved.recommended_lr == 1e-3
    assert saved.nesterov is True  # meta-trained with MetaConfig's default
    assert not torch.equal(out.gain, init.gain)


def test_paper_family_tasks_train_and_keep_the_frozen_positions(tmp_path):
    """``families=("vit", "paper")`` draws the paper's residual-free transformer too; its sinusoidal positions are a
    frozen parameter (no optimizer updates it), so the inner step leaves them exactly as they were."""
    from nfn_plugins.meta_train import Task, _load_train

    cfg = _tiny(families=("paper",), max_truncations=3)
    task = Task(cfg, _load_train(cfg), torch.Generator().manual_seed(0))
    assert task.family == "paper" and task.frozen == {"pos_embed"}
    weights = task.weights.map(lambda x: x.detach().requires_grad_())
    new, loss = task.step(None, weights, track=False)
    assert torch.isfinite(loss)
    assert torch.equal(new["pos_embed"], task.weights["pos_embed"])
    assert not torch.equal(new["up"], task.weights["up"])
    meta_train(tmp_path, _tiny(families=("vit", "paper"), max_truncations=6, seed=3), progress=False)
    assert {r["task"].split("-")[0] for r in _log(tmp_path)} == {"vit", "paper"}


def test_text_family_tasks_train_a_bert_on_speeches(tmp_path):
    """``bert`` tasks are BERTs on convention-speech passages: the blocks take the learned step, the token-embedding
    table the plain Adam step, and a run mixing families logs text tasks among the image ones."""
    from nfn_plugins.meta_train import TEXT_LEN, Task, _load_train

    cfg = _tiny(families=("bert",))
    data = _load_train(cfg)
    assert set(data) == {"convention_speeches"} and data["convention_speeches"][0].shape[1] == TEXT_LEN
    task = Task(cfg, data, torch.Generator().manual_seed(0))
    assert task.family == "bert" and not task.frozen
    table = "bert.embeddings.word_embeddings.weight"
    weights = task.weights.map(lambda x: x.detach().requires_grad_())
    new, loss = task.step(None, weights, track=False)
    assert torch.isfinite(loss)
    for name in ("q", "down", table):
        assert not torch.equal(new[name], task.weights[name]), name
    meta_train(tmp_path, _tiny(families=("vit", "bert"), max_truncations=6, seed=3), progress=False)
    assert {r["task"].split("-")[0] for r in _log(tmp_path)} == {"vit", "bert"}


def test_unknown_task_family_is_refused(tmp_path):
    import pytest

    from nfn_plugins.cli import main

    with pytest.raises(SystemExit, match="--families takes a comma-separated subset of vit, paper, bert"):
        main(["optim", "meta-train", "--out", str(tmp_path), "--families", "vit,gpt"])
