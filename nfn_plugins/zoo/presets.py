"""Named zoo configurations: the full zoos of ``recipes/build_zoo.py`` and a tiny one for CI.

Budget notes (2 CPU cores): an "epoch" here is ``steps_per_epoch`` mini-batches of ``batch_size``, not
a pass over the data, so that hundreds of members fit in an hour. The MNIST paper-family zoo trains
each member for 16 epochs x 75 steps x 16 samples = 19,200 samples (0.4 of an MNIST pass) and
checkpoints it after epochs 1, 2, 4, 8 and 16; small batches because this residual-free model learns
per update more than per sample. ``benchmarks/zoo_throughput.py`` measures the rate.
"""

from __future__ import annotations

import copy

from .build import HyperGrid, ZooConfig

# The paper's grid (Small Transformer Zoo), see HyperGrid's defaults.
PAPER_GRID = HyperGrid()

# HF models have residuals + LayerNorm and default-sized inits; the paper's 0.1-0.5 init std would be far
# larger than their usual 0.02, so the HF zoos use a range around it.
HF_GRID = HyperGrid(
    init_std=[0.01, 0.02, 0.05, 0.1, 0.2],
    dropout=[0.0, 0.1],
)

# Recipes like a user's: batch 64, good-to-poor learning rates, small inits, and the package's own learned optimizer
# ("nfn": `ZOO_LEARNED_UPDATE`, trained one by one), so that a predictor fitted on it has seen models as good as those
# recipes make.
RECIPES_GRID = HyperGrid(
    optimizer=["adam", "rmsprop", "sgd_momentum", "nfn"],
    lr={"adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "rmsprop": [1e-4, 3e-4, 1e-3, 3e-3],
        "sgd_momentum": [1e-2, 3e-2, 1e-1], "nfn": [3e-3, 5e-3, 1e-2, 2e-2]},
    init_std=[0.02, 0.05, 0.1, 0.2],
    weight_decay=[0.0, 1e-4, 1e-2],
    train_fraction=[1.0],
    dropout=[0.0, 0.1],
)

HF_WIDTHS = (16, 32, 48, 64)
HF_HEADS = (2, 4)
HF_DEPTHS = (1, 2, 3)


def _hf_archs(family: str, **extra) -> list[dict]:
    return [
        {"family": family, "d_model": d, "n_heads": h, "n_blocks": layers, "mlp_ratio": 2, **extra}
        for d in HF_WIDTHS
        for h in HF_HEADS
        for layers in HF_DEPTHS
    ]


# movie-review text: its own 2,000-word vocabulary, 48 tokens
MOVIE_TEXT = {"max_len": 48, "vocab_size": 2000}


def _paper_zoo(name: str, dataset: str, n_members: int = 416, checkpoint_epochs: tuple[int, ...] = (1, 2, 4, 8, 16),
               **extra) -> ZooConfig:
    """The paper's model and grid: 416 members x checkpoints after epochs 1, 2, 4, 8, 16 by default."""
    return ZooConfig(name=name, dataset=dataset, archs=[{"family": "paper"}], grid=PAPER_GRID, n_members=n_members,
                     checkpoint_epochs=list(checkpoint_epochs), steps_per_epoch=75, batch_size=16, eval_test_size=1000,
                     eval_train_size=200, members_per_batch=64, **extra)


def _hf_zoo(name: str, dataset: str, archs: list[dict], **extra) -> ZooConfig:
    """Small HF models over the width/head/depth grid: 768 members x checkpoints after epochs 1, 2, 4, 8."""
    extra.setdefault("eval_test_size", 1000)
    return ZooConfig(name=name, dataset=dataset, archs=archs, grid=HF_GRID, n_members=768,
                     checkpoint_epochs=[1, 2, 4, 8], steps_per_epoch=75, batch_size=16, eval_train_size=200,
                     members_per_batch=32, **extra)


PRESETS: dict[str, ZooConfig] = {
    # >= 2,000 checkpoints: 416 members x 5 checkpoint epochs, MNIST, the paper's model and grid.
    "mnist-paper": _paper_zoo("mnist-paper", "mnist"),
    # the same members 0-415 and 608 more (a member is fixed by seed and id): the predictor's learning curve
    "mnist-paper-1k": _paper_zoo("mnist-paper-1k", "mnist", n_members=1024),
    # members 0-255 of mnist-paper trained 3x longer (48 epochs = 57,600 samples, about one MNIST pass), closer to
    # the paper's zoo, whose members train for 100 passes; epoch 16 is mnist-paper's last checkpoint
    "mnist-paper-long": _paper_zoo("mnist-paper-long", "mnist", n_members=256, checkpoint_epochs=(1, 4, 16, 32, 48)),
    # the paper's model trained by user-like recipes (RECIPES_GRID, the learned optimizer among them) at batch 64,
    # checkpoints after 100, 300 and 1,000 steps: the range of accuracies such runs reach (0.1-0.9)
    "mnist-paper-recipes": ZooConfig(name="mnist-paper-recipes", dataset="mnist", archs=[{"family": "paper"}],
                                     grid=RECIPES_GRID, n_members=160, checkpoint_epochs=[1, 3, 10],
                                     steps_per_epoch=100, batch_size=64, eval_test_size=1000, eval_train_size=200,
                                     members_per_batch=32),
    # the paper's model on movie-review sentiment; same budget
    "movies-paper": _paper_zoo("movies-paper", "movie_reviews", dataset_kwargs=MOVIE_TEXT),
    # HF ViT on MNIST: widths 16-64, 2 or 4 heads, 1-3 blocks, 7x7 patches (16 tokens)
    "mnist-vit": _hf_zoo("mnist-vit", "mnist", _hf_archs("vit", patch_size=7)),
    # HF BERT on movie reviews (the whole 2,562-review test split)
    "movies-bert": _hf_zoo("movies-bert", "movie_reviews", _hf_archs("bert"), dataset_kwargs=MOVIE_TEXT,
                           eval_test_size=2562),
    # CI: a few seconds of training
    "tiny": ZooConfig(
        name="tiny",
        dataset="mnist",
        archs=[{"family": "paper", "d_model": 16, "n_heads": 2, "mlp_width": 32, "n_blocks": 1}],
        grid=PAPER_GRID,
        n_members=8,
        checkpoint_epochs=[1, 2],
        steps_per_epoch=3,
        batch_size=32,
        eval_test_size=200,
        eval_train_size=100,
        members_per_batch=2,
    ),
}


def preset(name: str) -> ZooConfig:
    """A copy of the named preset (edit it freely)."""
    if name not in PRESETS:
        raise KeyError(f"unknown zoo preset {name!r}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
