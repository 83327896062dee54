"""Hugging Face `TrainerCallback` that reads a run's predicted accuracy off its weights while it trains.

An `AccuracyPredictor` needs no evaluation data and no forward pass over it, so the check is cheap enough
to run every few hundred steps. The callback logs the prediction, stops runs whose prediction has
stopped improving (``patience``) and prunes runs predicted to stay poor (``prune_below``). Sweeps plug
in through ``on_prediction``; with Optuna, for example::

    def report(step, accuracy):
        trial.report(accuracy, step)
        return trial.should_prune()          # True stops the run

    PredictedAccuracyCallback("mnist-paper-recipes-collapse", every_n_steps=200, on_prediction=report).attach(trainer)

The predictor reads a run well only if the run resembles its zoos' members (benchmarks/results/predictor_tracking.md):
`mnist-paper-recipes-collapse` follows the paper's model trained by AdamW or the learned optimizer (its zoo has such
runs; on the latter it ends 0.07-0.10 low) and reads an SGD run stuck at chance at its class's frequency (0.115), but
another SGD run, at 0.39, as 0.63; `mnist-paper-long`, whose zoo has no such runs, levels off while the learned
optimizer's model still improves, so ``patience`` would stop it early.
For runs unlike the zoos' members stop on evaluation and log the prediction.

`attach` puts the callback first, so that the reporting integrations (TensorBoard, W&B, ...), which the
Trainer places before user callbacks, receive ``predicted_accuracy`` in their logs;
``trainer.add_callback(cb)`` works too, but then only ``trainer.state.log_history`` has the values.
Under DDP every process computes the same prediction from the same weights, so the stopping rules agree;
an ``on_prediction`` that decides on one process only must share its decision itself.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import TrainerCallback

from nfn_plugins.predictor import AccuracyPredictor


class PredictedAccuracyCallback(TrainerCallback):
    """Logs ``predicted_accuracy`` every ``every_n_steps`` optimizer steps (and at the end of training).

    Args:
        predictor: an `AccuracyPredictor`, or the name/directory of one (`AccuracyPredictor.from_pretrained`).
        every_n_steps: how often to read the weights.
        patience: stop after this many checks in a row without a prediction above the best so far + ``min_delta``.
        prune_below: stop if, from step ``prune_after_step`` on, the prediction is below this accuracy.
        on_prediction: called as ``on_prediction(step, predicted_accuracy)``; returning True stops the run.

    After training, ``history`` holds ``(step, prediction)`` pairs (the last one read when training ended)
    and ``stop_reason`` says why the callback stopped the run (None if it did not).
    """

    def __init__(self, predictor: AccuracyPredictor | str, every_n_steps: int = 100, patience: int | None = None,
                 min_delta: float = 0.0, prune_below: float | None = None, prune_after_step: int = 0,
                 on_prediction: Callable[[int, float], bool | None] | None = None):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 (or None to never stop on a plateau), got {patience}")
        self.predictor = AccuracyPredictor.from_pretrained(predictor) if isinstance(predictor, str) else predictor
        self.every_n_steps = every_n_steps
        self.patience, self.min_delta = patience, min_delta
        self.prune_below, self.prune_after_step = prune_below, prune_after_step
        self.on_prediction = on_prediction
        self.history: list[tuple[int, float]] = []
        self.stop_reason: str | None = None
        self._best = float("-inf")
        self._checks_since_best = 0
        self._unlogged: float | None = None

    def attach(self, trainer) -> "PredictedAccuracyCallback":
        """Register with ``trainer`` ahead of its other callbacks (see the module docstring); returns self."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._check(state, control, model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.history or self.history[-1][0] != state.global_step:
            self._check(state, control, model, final=True)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Adds the newest prediction to the logs the reporting integrations receive."""
        if logs is not None and self._unlogged is not None:
            logs["predicted_accuracy"] = self._unlogged
            self._unlogged = None
        return control

    def _check(self, state, control, model, final: bool = False) -> None:
        """Predict, record and report; unless training has already ended, apply the stopping rules."""
        if model is None:
            raise ValueError("PredictedAccuracyCallback needs the model: the Trainer passes it to callbacks")
        step = state.global_step
        accuracy = float(self.predictor.predict(model))
        self.history.append((step, accuracy))
        self._unlogged = accuracy
        state.log_history.append({"step": step, "predicted_accuracy": accuracy})
        if accuracy > self._best + self.min_delta:
            self._best, self._checks_since_best = accuracy, 0
        else:
            self._checks_since_best += 1
        stop_requested = bool(self.on_prediction(step, accuracy)) if self.on_prediction is not None else False
        if final:
            return
        reason = None
        if self.prune_below is not None and step >= self.prune_after_step and accuracy < self.prune_below:
            reason = f"pruned: predicted accuracy {accuracy:.3f} < {self.prune_below} at step {step}"
        elif self.patience is not None and self._checks_since_best >= self.patience:
            reason = (f"early stop: no predicted-accuracy gain over {self._best:.3f} + {self.min_delta} "
                      f"in {self.patience} checks (step {step})")
        elif stop_requested:
            reason = f"stopped by on_prediction at step {step} (predicted accuracy {accuracy:.3f})"
        if reason is not None and self.stop_reason is None:
            self.stop_reason = reason
            control.should_training_stop = True
