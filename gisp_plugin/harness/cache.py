"""A results cache keyed by everything that determines a result.

Each entry is a JSON file named by the hash of its key (model, method, options, calibration, seed,
targets, sparsity, evaluator spec, ...), written atomically, so an interrupted comparison loses at
most the item in progress and an extended one reuses everything already done. Tensors that belong to
an entry (FLAP's extra biases) sit beside it as safetensors. A damaged entry (a truncated file) is
named in a warning, dropped and computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    tmp.replace(path)


class ResultCache:
    """JSON entries (and optional tensors) under ``folder/<kind>/<hash>.json``."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, kind: str, key: dict[str, Any], suffix: str = ".json") -> Path:
        return self.folder / kind / f"{key_hash(key)}{suffix}"

    def get(self, kind: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The cached value for ``key``, or ``None``; a damaged entry is named, dropped and counts as a miss."""
        path = self._path(kind, key)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            if not isinstance(entry, dict) or "value" not in entry:
                raise ValueError("no 'value' in it")
        except (OSError, ValueError) as err:  # truncated, not UTF-8, not JSON
            self._drop(path, err)
            return None
        return entry["value"] if entry.get("key") == json.loads(json.dumps(key, default=str)) else None

    def _drop(self, path: Path, err: Exception) -> None:
        log.warning("cache entry %s is damaged (%s); dropping it and computing it again", path, " ".join(str(err).split()))
        path.unlink(missing_ok=True)

    def has_entries(self) -> bool:
        """Whether any result is cached (a folder with none holds nothing a new configuration could spoil)."""
        return self.folder.is_dir() and any(self.folder.rglob("*.json"))

    def put(self, kind: str, key: dict[str, Any], value: dict[str, Any]) -> None:
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"key": key, "value": value}, indent=1, default=str)
        _write_atomic(path, lambda p: p.write_text(payload))

    def get_tensors(self, kind: str, key: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The tensors stored with ``key`` (``{}`` when it has none); ``None`` when their file is damaged,
        which is then dropped with its JSON entry, so the caller computes both again."""
        path = self._path(kind, key, ".safetensors")
        if not path.exists():
            return {}
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            self._drop(path, err)
            self._path(kind, key).unlink(missing_ok=True)
            return None

    def put_tensors(self, kind: str, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        path = self._path(kind, key, ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        _write_atomic(path, lambda p: save_file(contiguous, str(p)))
