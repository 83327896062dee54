"""Hugging Face Trainer glue for `NFNOptimizer`.

Trainer's ``optimizer_cls_and_kwargs`` hands the optimizer anonymous parameter lists, but NFNOptimizer
needs the model to know which tensors form each block. Two one-line ways that keep that knowledge:

    trainer = Trainer(model, args, ..., optimizers=(NFNOptimizer(model, lr=args.learning_rate), None))
    trainer = NFNTrainer(model, args, ...)          # builds the optimizer in create_optimizer
"""

from __future__ import annotations

from transformers import Trainer

from nfn_plugins.optim import LearnedUpdate, NFNOptimizer


class NFNTrainerMixin:
    """Mix into any Trainer subclass: ``create_optimizer`` builds an NFNOptimizer from the model and args.

    Set ``nfn_learned`` (a `LearnedUpdate` or the name of a shipped one) before training to use a learned
    correction (a shipped one brings its validated base step: `DEFAULT_LEARNED_UPDATE`,
    `vit-paper-bert-1layer`, runs on Muon's); without one the optimizer is the equivariant Adam with the args' lr,
    betas, eps and decay.
    """

    nfn_learned: LearnedUpdate | str | None = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            learned = self.nfn_learned
            if isinstance(learned, str):
                learned = LearnedUpdate.from_pretrained(learned)
            a = self.args
            self.optimizer = NFNOptimizer(model or self.model, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                          eps=a.adam_epsilon, weight_decay=a.weight_decay, learned=learned)
        return self.optimizer


class NFNTrainer(NFNTrainerMixin, Trainer):
    """`transformers.Trainer` with `NFNOptimizer`."""
