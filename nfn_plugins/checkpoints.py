"""Pretrained weights on disk: safetensors + JSON config, written atomically, found by directory or shipped name.

Shipped weights live in ``nfn_plugins/pretrained/<name>/`` (small files: users need no training).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def available(fmt: str) -> list[str]:
    """Names of the shipped checkpoints of format ``fmt``."""
    return sorted(p.name for p in PRETRAINED_DIR.glob("*") if (p / "config.json").exists()
                  and json.loads((p / "config.json").read_text()).get("format") == fmt)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write through a unique temporary file in the same folder and ``os.replace``: a crash leaves the old file
    or the new one, never half of one, and concurrent writers (several processes) never share a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """``indent=None`` for files dominated by long number lists (loss curves): one line, no spaces after the
    separators (a line per number doubles such files, a space adds a tenth)."""
    write_atomic(path, json.dumps(obj, indent=indent, separators=(",", ":") if indent is None else None) + "\n")


def save(directory: str | os.PathLike, state: dict[str, torch.Tensor], fmt: str, config: dict, meta: dict) -> None:
    """``model.safetensors`` + ``config.json`` in ``directory``, each replaced atomically."""
    from safetensors.torch import save as to_bytes

    d = Path(directory)
    write_atomic(d / "model.safetensors", to_bytes({k: v.detach().float().contiguous() for k, v in state.items()}))
    write_json_atomic(d / "config.json", {"format": fmt, "config": config, "meta": meta})


def load(name_or_dir: str | os.PathLike, fmt: str, what: str) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(config, meta, state) from a directory or a shipped name; clear errors for anything else."""
    from safetensors.torch import load_file

    d = Path(name_or_dir)
    if not (d / "config.json").exists():
        d = PRETRAINED_DIR / str(name_or_dir)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"no {what} at {name_or_dir!r}: not a directory with config.json, and not a shipped "
                                f"name (shipped: {', '.join(available(fmt)) or 'none'})")
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("format") != fmt:
        raise ValueError(f"{d / 'config.json'} is not an nfn-plugins {what} (format {cfg.get('format')!r}, expected {fmt!r})")
    return cfg["config"], cfg.get("meta", {}), load_file(str(d / "model.safetensors"))


class Pretrained:
    """`save_pretrained` / `from_pretrained` / `available` for a module built from a JSON-able ``config``.

    Subclasses set ``FORMAT`` (written into and checked against config.json) and ``WHAT`` (for errors), keep
    ``config`` (a dict or a dataclass) and ``meta``, and override `_from_config` to read older configs.
    """

    FORMAT: str
    WHAT: str
    config: Any
    meta: dict

    @classmethod
    def _from_config(cls, config: dict):
        return cls(**config)

    def save_pretrained(self, directory: str | os.PathLike, **meta) -> None:
        """safetensors weights (float32) + JSON config and metadata (the model's, updated by ``meta``)."""
        config = asdict(self.config) if is_dataclass(self.config) else dict(self.config)
        save(directory, self.state_dict(), self.FORMAT, config, {**self.meta, **meta})

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike):
        """From a directory, or by the name of one shipped with the package (see `available`); in eval mode."""
        config, meta, state = load(name_or_dir, cls.FORMAT, cls.WHAT)
        model = cls._from_config(config)
        model.load_state_dict(state)
        model.meta = meta
        return model.eval()

    @classmethod
    def available(cls) -> list[str]:
        """Names of the checkpoints of this kind shipped with the package."""
        return available(cls.FORMAT)
