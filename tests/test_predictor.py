"""AccuracyPredictor: learns, is invariant, persists, and runs end to end on a tiny real zoo."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from nfn_plugins import SymmetryGroup, WeightSpace, extract_weights
from nfn_plugins.predictor import AccuracyPredictor, FitConfig, PredictorConfig, as_groups

SMALL = PredictorConfig(channels=6, hidden=16, product_channels=2, invariant_dim=8, head_hidden=16)


def _synthetic(n: int, d: int, seed: int) -> tuple[WeightSpace, torch.Tensor]:
    """Tiny BERT weight spaces whose label is an invariant function of the weights (MLP weight scale)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = BertConfig(hidden_size=d, num_hidden_layers=1, num_attention_heads=2, intermediate_size=2 * d,
                     vocab_size=20, max_position_embeddings=8)
    ws = extract_weights(BertForSequenceClassification(cfg))
    scale = torch.rand(n, generator=gen) * 2 + 0.2
    batch = ws.map(lambda x: torch.randn((n,) + x.shape, generator=gen) / d**0.5)
    batch.tensors["up"] = batch["up"] * scale[:, None, None, None]
    return batch, torch.sigmoid(2 * (scale - 1.2))


@pytest.mark.parametrize("scale_head_layers, target", [(0, 0.6), (2, 0.8)])
def test_fit_learns_an_invariant_target(scale_head_layers, target):
    """The target is one tensor's norm: with a scale head (0.55 with per-feature scaled log-norms) and
    without one (only the NFN's head, which must learn it through the pooled features and raw log-norms)."""
    train, val = _synthetic(96, 16, 0), _synthetic(48, 16, 1)
    torch.manual_seed(0)
    model = AccuracyPredictor(replace(SMALL, scale_head_layers=scale_head_layers))
    before = model.evaluate(val)["kendall_tau"]
    history = model.fit(train, val, FitConfig(epochs=12, batch_size=16, lr=3e-3), progress=False)
    assert history[-1]["train_bce"] < history[0]["train_bce"]
    assert model.evaluate(val)["kendall_tau"] > target > before


@pytest.mark.parametrize("scale_head_layers", [0, 2])
def test_prediction_is_invariant_and_width_agnostic(scale_head_layers):
    model = AccuracyPredictor(replace(SMALL, scale_head_layers=scale_head_layers)).double()
    with torch.no_grad():  # zero at initialisation with a scale head: without this the NFN path is not tested
        torch.nn.init.normal_(model.nfn.head[-1].weight)
    for d in (16, 24):
        ws, _ = _synthetic(3, d, 2)
        ws = ws.double()
        g = SymmetryGroup(ws.spec).sample(torch.Generator().manual_seed(d), unit_scales=False)
        p, p_moved = model.predict(ws), model.predict(g.act(ws))
        assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
        assert (p - p_moved).abs().max() < 1e-10


def test_predict_accepts_models_and_single_weight_spaces():
    model = AccuracyPredictor(SMALL)
    net = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32, vocab_size=20, max_position_embeddings=8))
    p = model.predict(net)
    assert p.shape == () and torch.allclose(p, model.predict(extract_weights(net)))
    with pytest.raises(TypeError, match="nn.Module, a WeightSpace or a Zoo"):
        model.predict([1, 2, 3])


def test_save_and_load_round_trip(tmp_path):
    model = AccuracyPredictor(SMALL)
    ws, _ = _synthetic(4, 16, 3)
    model.save_pretrained(tmp_path / "p", trained_on="synthetic")
    loaded = AccuracyPredictor.from_pretrained(tmp_path / "p")
    assert torch.equal(loaded.predict(ws), model.predict(ws))
    assert loaded.meta["trained_on"] == "synthetic"
    with pytest.raises(FileNotFoundError, match="shipped"):
        AccuracyPredictor.from_pretrained("no-such-predictor")


def test_first_fit_sets_the_scale_standardiser_and_later_fits_keep_it(tmp_path):
    train, other = _synthetic(32, 16, 0), _synthetic(32, 16, 3)
    model = AccuracyPredictor(replace(SMALL, scale_head_layers=2))
    cfg = FitConfig(epochs=1, batch_size=16)
    model.fit(train, config=cfg, progress=False)
    norm = model.nfn.scale_norm
    fitted = norm.mean.clone(), norm.std.clone()
    assert norm.fitted and torch.isfinite(fitted[0]).all()
    model.fit((other[0].map(lambda t: 3 * t), other[1]), config=cfg, progress=False)  # other norms: kept
    assert torch.equal(norm.mean, fitted[0]) and torch.equal(norm.std, fitted[1])
    model.save_pretrained(tmp_path / "p")
    loaded = AccuracyPredictor.from_pretrained(tmp_path / "p")
    assert torch.equal(loaded.nfn.scale_norm.mean, fitted[0])
    assert torch.equal(loaded.predict(train[0]), model.predict(train[0]))


def test_bad_training_data_is_refused():
    ws, y = _synthetic(4, 16, 4)
    with pytest.raises(ValueError, match=r"accuracies in \[0, 1\]"):
        as_groups((ws, y * 5))
    with pytest.raises(ValueError, match="do not match"):
        as_groups((ws, y[:3]))
    ws.tensors["up"][2] = float("inf")  # overflowed weights: a clear error naming the item, not NaN training
    with pytest.raises(FloatingPointError, match=r"items \[2\]"):
        AccuracyPredictor(SMALL).fit((ws, y), config=FitConfig(epochs=1, batch_size=4, augment=False), progress=False)


def test_end_to_end_on_a_tiny_real_zoo(tmp_path):
    """Build a tiny MNIST zoo with the real builder, fit a predictor, predict a freshly trained model."""
    zoo_mod = pytest.importorskip("nfn_plugins.zoo")
    from nfn_plugins.zoo.presets import preset

    cfg = preset("tiny")
    zoo_mod.build_zoo(cfg, tmp_path / "zoo", progress=False)
    zoo = zoo_mod.Zoo.open(tmp_path / "zoo")
    train, val, _ = zoo.split((0.5, 0.25, 0.25))
    model = AccuracyPredictor(SMALL)
    history = model.fit(train, val, FitConfig(epochs=2, batch_size=4), progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["train_bce"])) for h in history)
    preds = model.predict(zoo)
    assert preds.shape == (len(zoo),) and ((preds >= 0) & (preds <= 1)).all()


def test_fit_command_trains_and_saves_a_loadable_predictor(tmp_path):
    """`nfn-plugins predictor fit` (the recipe behind the shipped predictors) on a tiny real zoo."""
    from nfn_plugins.cli import main
    from nfn_plugins.zoo import Zoo, build_zoo
    from nfn_plugins.zoo.presets import preset

    build_zoo(preset("tiny"), tmp_path / "zoo", progress=False)
    assert main(["predictor", "fit", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "p"), "--epochs", "1"]) == 0
    loaded = AccuracyPredictor.from_pretrained(tmp_path / "p")
    assert "tiny" in loaded.meta["summary"] and len(loaded.meta["history"]) == 1
    # a rerun of the recipe gives the same predictor, bit for bit (the initial weights are seeded too)
    assert main(["predictor", "fit", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "p2"), "--epochs", "1"]) == 0
    again = AccuracyPredictor.from_pretrained(tmp_path / "p2").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in loaded.state_dict().items())
    assert loaded.config.scale_head_layers == 0  # the default: the single head
    assert main(["predictor", "fit", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "s"), "--epochs", "1",
                 "--scale-head-layers", "2"]) == 0
    assert AccuracyPredictor.from_pretrained(tmp_path / "s").nfn.scale_norm.fitted
    # the collapse head: classes from the zoo, collapsed members read off it (the dataset's test subset)
    assert main(["predictor", "fit", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "c"), "--epochs", "1",
                 "--collapse-head"]) == 0
    collapse = AccuracyPredictor.from_pretrained(tmp_path / "c").collapse
    assert collapse.n_classes == 10 and ((collapse.class_accuracy > 0) & (collapse.class_accuracy < 1)).all()
    # probe features: the architectures to run come from the zoo's records
    assert main(["predictor", "fit", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "r"), "--epochs", "1",
                 "--probes", "2"]) == 0
    probing = AccuracyPredictor.from_pretrained(tmp_path / "r")
    assert probing.probe.probes.shape[0] == 2 and probing.config.probe_archs == Zoo.open(tmp_path / "zoo").archs
    with pytest.raises(SystemExit, match="no finite checkpoints at epoch 99"):
        main(["predictor", "fit", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "q"), "--epoch", "99"])


def test_evaluate_command_scores_only_the_members_the_fit_held_out(tmp_path):
    """`nfn-plugins predictor evaluate` on the zoo a predictor was fitted on: its validation members only."""
    from nfn_plugins.cli import main
    from nfn_plugins.predictor_cli import FIT_SPLIT
    from nfn_plugins.zoo import Zoo, build_zoo
    from nfn_plugins.zoo.presets import preset

    build_zoo(preset("tiny"), tmp_path / "zoo", progress=False)
    zoo = Zoo.open(tmp_path / "zoo").filter(finite=True)
    fit = ["predictor", "fit", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "p"), "--epochs", "1"]
    assert main(fit + ["--seed", "3"]) == 0
    held_out = set(zoo.split(FIT_SPLIT, seed=3)[1].members)
    assert held_out != set(zoo.split(FIT_SPLIT, seed=0)[1].members)  # the stored seed matters here
    report_file = tmp_path / "report.json"
    assert main(["predictor", "evaluate", "--predictor", str(tmp_path / "p"), "--zoo", str(tmp_path / "zoo"),
                 "--json", str(report_file)]) == 0
    (report,) = json.loads(report_file.read_text())
    assert report["held_out_by_fit"] and report["members"] == len(held_out)
    expected = zoo.filter(where=lambda r: r["member"] in held_out)
    assert report["checkpoints"] == len(expected)  # every epoch
    scores = AccuracyPredictor.from_pretrained(tmp_path / "p").evaluate(expected)
    assert all(report[k] == pytest.approx(v) for k, v in scores.items())  # those members, not others
    with pytest.raises(SystemExit, match=r"0 checkpoint\(s\) left"):
        main(["predictor", "evaluate", "--predictor", str(tmp_path / "p"), "--zoo", str(tmp_path / "zoo"),
              "--min-test-acc", "1.5"])


def test_fit_ends_with_the_best_validation_epoch():
    train, val = _synthetic(48, 16, 0), _synthetic(24, 16, 1)
    for restore in (True, False):
        torch.manual_seed(2)
        model = AccuracyPredictor(replace(SMALL, head_layers=1))  # a setting found to peak before the last epoch
        cfg = FitConfig(epochs=6, batch_size=16, lr=1e-2, seed=2, restore_best=restore,
                        max_grad_norm=None)  # unclipped, the last epoch is not the best here
        history = model.fit(train, val, cfg, progress=False)
        taus = [r["val_kendall_tau"] for r in history]
        assert taus[-1] < max(taus)  # in this setting the last epoch is not the best, so restoring is observable
        final = model.evaluate(val)["kendall_tau"]
        assert final == pytest.approx(max(taus) if restore else taus[-1], abs=1e-6)
        assert [r.get("best", False) for r in history].count(True) == (1 if restore else 0)


def test_predictors_saved_before_newer_options_load_unchanged(tmp_path):
    """A config without the newer options (older files) loads as saved: no clip, one head layer, no scale head."""
    import json

    old = replace(SMALL, feature_limit=None, head_layers=1, scale_head_layers=0)
    torch.manual_seed(0)
    model = AccuracyPredictor(old)
    model.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "config.json"
    saved = json.loads(path.read_text())
    del saved["config"]["feature_limit"], saved["config"]["head_layers"], saved["config"]["scale_head_layers"]
    path.write_text(json.dumps(saved))
    loaded = AccuracyPredictor.from_pretrained(tmp_path / "p")
    assert loaded.config == old
    ws, _ = _synthetic(4, 16, 5)
    assert torch.equal(loaded.predict(ws), model.predict(ws))
