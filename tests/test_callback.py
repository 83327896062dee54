"""PredictedAccuracyCallback: logging, early stopping, pruning and sweep hooks inside a real HF Trainer."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from model_factories import build
from nfn_plugins.integrations.callback import PredictedAccuracyCallback
from nfn_plugins.predictor import AccuracyPredictor, PredictorConfig


class ScriptedPredictor:
    """Returns the given accuracies in turn, so the stopping logic is checked exactly."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def predict(self, model):
        self.calls += 1
        return torch.tensor(self.values[min(self.calls, len(self.values)) - 1])


class LogRecorder(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): keeps the logs it receives."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


def _train(tmp_path, callback, max_steps=10, attach=False, recorder=None):
    from transformers import Trainer, TrainingArguments

    model, make_inputs = build("bert")
    model = model.float()
    batch = make_inputs(0)
    rows = [{"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i],
             "labels": torch.tensor(i % 2)} for i in range(len(batch["input_ids"]))] * 8
    args = TrainingArguments(str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, report_to=[],
                             save_strategy="no", learning_rate=1e-3, use_cpu=True, logging_steps=1)
    trainer = Trainer(model, args, train_dataset=rows, callbacks=[recorder] if recorder else None)
    if attach:
        callback.attach(trainer)
    else:
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def test_early_stop_when_the_prediction_plateaus(tmp_path):
    cb = PredictedAccuracyCallback(ScriptedPredictor([0.5, 0.6, 0.6, 0.6, 0.9]), every_n_steps=1, patience=2)
    trainer = _train(tmp_path, cb)
    assert trainer.state.global_step == 4  # best 0.6 at step 2, then two checks without a gain
    assert cb.stop_reason.startswith("early stop")
    assert cb.history == [(1, 0.5), (2, pytest.approx(0.6)), (3, pytest.approx(0.6)), (4, pytest.approx(0.6))]
    logged = [r["predicted_accuracy"] for r in trainer.state.log_history if "predicted_accuracy" in r]
    assert logged[:4] == pytest.approx([0.5, 0.6, 0.6, 0.6])


def test_prunes_runs_predicted_to_stay_poor(tmp_path):
    cb = PredictedAccuracyCallback(ScriptedPredictor([0.1] * 10), every_n_steps=1, prune_below=0.2, prune_after_step=3)
    trainer = _train(tmp_path, cb)
    assert trainer.state.global_step == 3
    assert cb.stop_reason.startswith("pruned")


def test_sweep_hook_sees_every_check_and_can_stop(tmp_path):
    seen = []
    cb = PredictedAccuracyCallback(ScriptedPredictor([0.3, 0.4, 0.5, 0.6]), every_n_steps=2,
                                   on_prediction=lambda step, acc: seen.append((step, acc)) or step >= 6)
    trainer = _train(tmp_path, cb)
    assert trainer.state.global_step == 6
    assert seen == [(2, pytest.approx(0.3)), (4, pytest.approx(0.4)), (6, pytest.approx(0.5))]
    assert cb.stop_reason.startswith("stopped by on_prediction")


def test_real_predictor_reads_the_trained_weights(tmp_path):
    torch.manual_seed(0)
    predictor = AccuracyPredictor(PredictorConfig(channels=4, hidden=8, product_channels=2, invariant_dim=8,
                                                  head_hidden=8))
    cb = PredictedAccuracyCallback(predictor, every_n_steps=2)
    trainer = _train(tmp_path, cb, max_steps=5)
    assert [s for s, _ in cb.history] == [2, 4, 5]  # every 2 steps, and once more at the end
    assert cb.stop_reason is None and trainer.state.global_step == 5
    assert cb.history[-1][1] == pytest.approx(float(predictor.predict(trainer.model)), abs=1e-6)
    assert all(0.0 < a < 1.0 for _, a in cb.history)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="every_n_steps"):
        PredictedAccuracyCallback(ScriptedPredictor([0.5]), every_n_steps=0)
    with pytest.raises(ValueError, match="patience"):
        PredictedAccuracyCallback(ScriptedPredictor([0.5]), patience=0)


def test_attach_puts_the_prediction_into_the_logs_reporters_receive(tmp_path):
    recorder = LogRecorder()  # registered before the callback, like the Trainer's reporting integrations
    cb = PredictedAccuracyCallback(ScriptedPredictor([0.3, 0.4, 0.5]), every_n_steps=2)
    _train(tmp_path, cb, max_steps=4, attach=True, recorder=recorder)
    reported = [r["predicted_accuracy"] for r in recorder.seen if "predicted_accuracy" in r]
    assert reported == pytest.approx([0.3, 0.4])  # steps 2 and 4 (the end-of-training read is not logged)


def test_the_read_at_the_end_of_training_stops_nothing(tmp_path):
    cb = PredictedAccuracyCallback(ScriptedPredictor([0.5, 0.1]), every_n_steps=3, prune_below=0.2)
    trainer = _train(tmp_path, cb, max_steps=4)
    assert trainer.state.global_step == 4
    assert [s for s, _ in cb.history] == [3, 4] and cb.stop_reason is None
