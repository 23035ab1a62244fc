"""A results cache keyed by everything that determines a result.

Each entry is a JSON file named by the hash of its key (model, method, options, calibration, seed,
targets, sparsity, evaluator spec, ...), written atomically, so an interrupted comparison loses at
most the item in progress and an extended one reuses everything already done. Tensors that belong to
an entry (FLAP's extra biases) sit beside it as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


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
        path = self._path(kind, key)
        if not path.exists():
            return None
        entry = json.loads(path.read_text())
        return entry["value"] if entry.get("key") == json.loads(json.dumps(key, default=str)) else None

    def put(self, kind: str, key: dict[str, Any], value: dict[str, Any]) -> None:
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"key": key, "value": value}, indent=1, default=str)
        _write_atomic(path, lambda p: p.write_text(payload))

    def get_tensors(self, kind: str, key: dict[str, Any]) -> dict[str, torch.Tensor]:
        path = self._path(kind, key, ".safetensors")
        return load_file(path) if path.exists() else {}

    def put_tensors(self, kind: str, key: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        path = self._path(kind, key, ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        _write_atomic(path, lambda p: save_file(contiguous, str(p)))
