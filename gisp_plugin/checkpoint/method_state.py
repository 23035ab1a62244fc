"""A method's finished steps, saved in the job's work folder so that an interrupted run resumes exactly.

A state file is a JSON object: a format tag, a fingerprint of everything the steps depend on
(``job_fingerprint``) and the method's own fields. It is written atomically after each finished step (a crash mid-write leaves
the previous state), and a file from another run (another model, options or data) is ignored with a
warning. Methods call these on rank 0 only; every rank resumes from what rank 0 read (``from_main``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from gisp_plugin.importance.gradients import weight_paths, weight_tensor
from gisp_plugin.methods.api import PruningJob
from gisp_plugin.methods.options import options_to_dict

log = logging.getLogger(__name__)


def job_fingerprint(job: PruningJob, with_targets: bool = True) -> str:
    """A hash of the weights, options, calibration data, seed, dtype and shape constraint of ``job`` (and its
    targets, unless ``with_targets`` is false: for a search whose steps do not depend on where it stops).

    Without a work folder no state is read or written, so the hash (a pass over every weight) is skipped: ``""``.
    """
    if job.work_dir is None:
        return ""
    digest = hashlib.sha256()
    for path in weight_paths(job.anatomy, include_dependents=True):
        tensor = weight_tensor(job.model, path).detach()
        digest.update(
            f"{path}:{tuple(tensor.shape)}:{float(tensor.double().sum())!r}:{float(tensor.double().abs().sum())!r}".encode()
        )
    calibration = job.calibration
    if calibration is not None:
        for sequence, mask, polarity in zip(calibration.sequences, calibration.loss_masks, calibration.polarity, strict=True):
            digest.update(sequence.to(torch.int64).numpy().tobytes() + mask.to(torch.uint8).numpy().tobytes())
            digest.update(str(polarity).encode())
    meta = {
        "options": options_to_dict(job.options),
        "calibration": calibration.name if calibration is not None else None,
        "targets": list(job.targets) if with_targets else None,
        "seed": job.seed,
        "dtype": str(next(job.model.parameters()).dtype),
        "shape": job.anatomy.shape,
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def read_state(work_dir: Path | None, file_name: str, format_tag: str, fingerprint: str) -> dict[str, Any] | None:
    """The fields saved by an identical run in ``work_dir``, or ``None`` (no file, another run, unreadable)."""
    path = Path(work_dir) / file_name if work_dir is not None else None
    if path is None or not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError as err:
        log.warning("ignoring %s (%s); starting over", path, err)
        return None
    if not isinstance(state, dict) or state.get("format") != format_tag or state.get("fingerprint") != fingerprint:
        log.warning("ignoring %s: it is from a different run (model, options, data or targets differ); starting over", path)
        return None
    return {key: value for key, value in state.items() if key not in ("format", "fingerprint")}


def write_state(work_dir: Path | None, file_name: str, format_tag: str, fingerprint: str, fields: dict[str, Any]) -> None:
    """Write ``fields`` atomically as ``work_dir / file_name`` (nothing without a work folder)."""
    if work_dir is None:
        return
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = work_dir / (file_name + ".tmp")
    tmp.write_text(json.dumps({"format": format_tag, "fingerprint": fingerprint, **fields}))
    tmp.replace(work_dir / file_name)
