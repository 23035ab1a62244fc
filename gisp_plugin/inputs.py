"""Checks of user inputs that every entry point shares (command line, comparison file, Python API).

They run before any model is loaded, so a typo costs nothing, and every failure is one ``InputError``
line that names the bad value and what would be valid. Only ``config.json`` is read to learn a model's
context length, never its weights.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch


class InputError(ValueError):
    """A value given by the user that cannot be used; the message says what to give instead."""


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (bools and floats refused) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_fraction_list(name: str, values: Any) -> list[float]:
    """A non-empty list of finite numbers (the range is checked where the meaning is known)."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise InputError(f"{name} must be a list of numbers such as [0.2, 0.4], got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{name} must hold numbers such as 0.2, got {value!r}")
        out.append(float(value))
    return out


def check_name_list(name: str, values: Any) -> list[str]:
    """A list of non-empty strings (a comma-separated string is split)."""
    if isinstance(values, str):
        values = [part.strip() for part in values.split(",") if part.strip()]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in values):
        raise InputError(f"{name} must be a list of names, got {values!r}")
    return [v.strip() for v in values]


def check_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{name} must be a non-empty string, got {value!r}")
    return value.strip()


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(name: str | torch.device) -> torch.device:
    """A device torch knows and this machine has: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, ..."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown device {name!r}; give cpu, cuda, cuda:N or mps") from err
    if device.type not in DEVICE_TYPES:
        raise InputError(f"device {name!r} cannot run a model here; give cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} asked for, but no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    return device


def check_attention(name: str | None) -> str | None:
    """An attention implementation transformers knows (``eager``, ``sdpa``, ...), or a hub kernel ``owner/name``."""
    if name is None or "/" in name:
        return name
    from transformers import AttentionInterface

    known = ["eager", *AttentionInterface._global_mapping]
    if name not in known:
        raise InputError(f"unknown attention implementation {name!r}; choose one of {', '.join(known)}")
    return name


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """A folder path that is not a file and whose nearest existing ancestor is writable."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a file; give a folder path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise OSError(f"{str(existing)!r} is not a folder")
        with tempfile.TemporaryFile(dir=existing):  # the real test (root passes os.access everywhere); removed at once
            pass
    except OSError as err:
        raise InputError(f"{what} {str(path)!r} cannot be written ({err}); choose another place") from err
    return path


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_limit(config: Any) -> int | None:
    """The longest input a model config allows (``max_position_embeddings`` and its aliases), if it says."""
    if config is None:
        return None
    for key in CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def folder_context_limit(folder: str | Path) -> int | None:
    """The context limit from a local model folder's ``config.json`` (weights are not read)."""
    config_file = Path(folder) / "config.json"
    try:
        return context_limit(json.loads(config_file.read_text()))
    except (OSError, ValueError):
        return None  # loading the model reports a missing or corrupt config properly


def check_seqlen(what: str, seqlen: int, limit: int | None, model: str) -> None:
    """Refuse a sequence length beyond the positions the model was built for."""
    if limit is not None and seqlen > limit:
        raise InputError(
            f"{what} seqlen={seqlen} is longer than model {model!r} allows (max_position_embeddings={limit}); "
            f"give seqlen <= {limit}"
        )
