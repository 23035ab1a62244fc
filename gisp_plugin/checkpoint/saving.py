"""Saving and loading compacted models: a normal HF folder plus the pruning record.

A saved folder holds ``model.safetensors``, ``config.json``, the tokenizer, ``pruning.json`` and the model
card ``README.md``. A compacted model whose layers differ in shape is saved with ``auto_map`` to the
modelling file copied beside it (``trust_remote_code=True`` loads it without this package); the family's own
model (``export.native.saved_form``: every layer of one shape) is saved as it is, and loads without remote
code. Folders are written under a temporary name and renamed when complete, so an interrupted save never
leaves a half-written model behind; an old folder is renamed aside and deleted only once the new one is in
place, so no crash loses both. No pickle: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

import gisp_plugin
from gisp_plugin.compaction import modeling_gisp_pruned
from gisp_plugin.compaction.modeling_gisp_pruned import pruned_classes
from gisp_plugin.deploy.model_card import write_model_card
from gisp_plugin.distributed.context import DistributedSetup
from gisp_plugin.inputs import check_device
from gisp_plugin.models.weights import ModelLoadError, check_loading_info, check_weights, parse_dtype

RECORD_FILE = "pruning.json"
RECORD_FORMAT = "gisp-pruned/2"


class CheckpointError(OSError):
    """A folder that is missing, corrupt, or not a gisp-plugin pruned model."""


@dataclass
class PruningRecord:
    """How a pruned model came to be: enough to reproduce it and to rebuild it from the dense model."""

    base_model: str
    method: str
    options: dict[str, Any]
    target: float
    sparsity: float
    params: dict[str, int]
    layers: list[dict[str, Any]]
    pruned_structures: dict[str, dict[str, list[int]]]
    calibration: str | None = None
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    distributed: dict[str, Any] = field(default_factory=lambda: DistributedSetup().record())  # world_size, backend, fsdp
    shape: str = "free"  # the shape constraint it was pruned under (gisp_plugin.importance.shapes)
    format: str = RECORD_FORMAT
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    gisp_plugin_version: str = field(default_factory=lambda: gisp_plugin.__version__)


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of the decoder layers and of the whole model, counted from the real tensors."""
    unique = {id(p): p for p in model.parameters()}
    return {
        "decoder": sum(p.numel() for p in model.model.layers.parameters()),
        "total": sum(p.numel() for p in unique.values()),
    }


def save_pruned(
    model: PreTrainedModel,
    tokenizer: Any,
    out_dir: str | Path,
    record: PruningRecord,
    evaluations: dict[str, dict[str, float]] | None = None,
) -> Path:
    """Write a compacted model, its tokenizer, its record and its model card (``README.md``, with
    ``evaluations`` when given) to ``out_dir`` (replaced atomically)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _restore_aside(out_dir)
    try:
        model.save_pretrained(tmp)
        if is_gisp_pruned(model.config):
            shutil.copy(modeling_gisp_pruned.__file__, tmp / "modeling_gisp_pruned.py")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(asdict(record), indent=1))
        write_model_card(tmp, asdict(record), evaluations)
    except BaseException:  # an error or a stop (Ctrl-C, torchrun's SIGTERM) mid-save leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, out_dir)
    return out_dir


def _aside(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.old")


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Put the complete folder ``tmp`` at ``out_dir``. An old folder there is renamed aside first and deleted
    only once the new one is in place; if the swap fails, the old one is put back and ``tmp`` removed. A crash
    between the two renames leaves the old folder whole beside it, which the next save puts back first."""
    aside = _aside(out_dir)
    replacing = out_dir.exists()
    if replacing:
        os.replace(out_dir, aside)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if replacing:
            os.replace(aside, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replacing:
        shutil.rmtree(aside, ignore_errors=True)


def _restore_aside(out_dir: Path) -> None:
    """Undo what a save that crashed mid-swap left: the old folder renamed aside is put back where it was
    (or, when the new one made it into place, deleted)."""
    aside = _aside(out_dir)
    if not aside.exists():
        return
    if out_dir.exists():
        shutil.rmtree(aside)
    else:
        os.replace(aside, out_dir)


def read_record(path: str | Path) -> dict[str, Any]:
    """The pruning record of a saved folder, validated."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no pruned model folder at {str(path)!r}")
    record_file = path / RECORD_FILE
    if not record_file.exists():
        raise CheckpointError(
            f"{str(path)!r} is not a gisp-plugin pruned model (no {RECORD_FILE}); "
            "load a dense model with AutoModelForCausalLM.from_pretrained"
        )
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{record_file} is corrupt: {err}") from err
    if record.get("format") == "gisp-pruned/1":
        raise CheckpointError(
            f"{str(path)!r} was saved by an older gisp-plugin (format gisp-pruned/1); load it with "
            "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True), or prune again"
        )
    if record.get("format") != RECORD_FORMAT:
        raise CheckpointError(f"{record_file} has format {record.get('format')!r}, expected {RECORD_FORMAT!r}")
    return record


def is_gisp_pruned(config: Any) -> bool:
    """Whether a config (object or ``config.json`` dict) is a pruned model's with per-layer shapes (remote code)."""
    if isinstance(config, dict):
        return bool(config.get("pruning_base_model_type"))
    return bool(getattr(config, "pruning_base_model_type", None))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_pruned_folder(path: str | Path) -> bool:
    return (Path(path) / RECORD_FILE).exists()


def load_pruned(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a folder written by ``save_pruned``: with this package's modelling classes, or as the family's own model."""
    device = check_device(device)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    path = Path(path)
    record = read_record(path)
    try:
        config_data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / 'config.json'} is missing or corrupt: {err}") from err
    if is_gisp_pruned(config_data):
        try:
            _, model_cls = pruned_classes(config_data["pruning_base_model_type"])
        except KeyError as err:
            raise CheckpointError(
                f"{str(path)!r} has config model_type {config_data.get('model_type')!r}, not a gisp-plugin pruned model "
                f"of a family this transformers knows ({err})"
            ) from err
    else:  # saved in the family's own form
        model_cls = AutoModelForCausalLM
    try:
        check_weights(path)  # safetensors only, each file complete
    except ModelLoadError as err:
        raise CheckpointError(str(err)) from err
    kwargs: dict[str, Any] = {
        "dtype": dtype or "auto",
        "use_safetensors": True,
        "output_loading_info": True,  # a config.json edited after saving would leave random or unused tensors
        "ignore_mismatched_sizes": True,  # reported with the shapes, refused by check_loading_info
    }
    if model_cls is AutoModelForCausalLM:
        kwargs["trust_remote_code"] = False
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = model_cls.from_pretrained(path, **kwargs)
    except Exception as err:  # safetensors/transformers raise many types for damaged files
        raise CheckpointError(f"could not load the pruned model in {str(path)!r}: {_first_line(err)}") from err
    check_loading_info(info, path, CheckpointError)
    expected = record["params"]["decoder"]
    actual = count_params(model)["decoder"]
    if actual != expected:
        raise CheckpointError(f"{str(path)!r} holds {actual} decoder parameters, its record says {expected}")
    return model.to(device).eval()
