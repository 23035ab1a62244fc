"""``gisp export``: one pruned (or dense) model folder written in an engine's format, atomically.

The request is checked before any model is loaded (the format exists, ``--out`` is free, the source is a
model folder); the format's own check refuses what it cannot express before anything is written; the
output is written under a temporary name beside ``--out`` and renamed when complete, so an error or an
interruption leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from gisp_plugin.export.api import ExportError, ExportFormat, ExportOptions, ExportReport
from gisp_plugin.inputs import check_name_list
from gisp_plugin.models.loading import load_model, resolve_model_path
from gisp_plugin.plugins.manager import lookup

log = logging.getLogger(__name__)
REPORT_FILE = "export.json"


def export_format(name: str) -> ExportFormat:
    """The registered format called ``name`` (an unknown one names those available)."""
    return lookup("export format", name)


def check_export_formats(names: str | Sequence[str] | None) -> list[str]:
    """Format names to export to (a list, or one comma-separated string; ``None``: none), each registered:
    the one check of ``gisp prune --export`` and of a comparison's ``export`` key."""
    names = check_name_list("export", [] if names is None else names)
    for name in names:
        export_format(name)
    return names


def default_out(source: Path, fmt: ExportFormat, options: ExportOptions) -> Path:
    """Where ``--export`` puts a format beside a saved folder: ``NAME.gguf``, ``NAME-nemotron-nas``, ``NAME-hf``."""
    if fmt.single_file:
        return source.with_name(f"{source.name}-{options.weight_type}.gguf")
    return source.with_name(f"{source.name}-{fmt.name}")


def export_beside(saved: Path, names: list[str], options: ExportOptions) -> list[ExportReport]:
    """Export a just-saved folder in every format named, beside it (``default_out``); a stale export of an
    earlier run of the same folder is replaced."""
    reports = []
    for name in names:
        out = default_out(saved, export_format(name), options)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        reports.append(export_folder(saved, name, out, options))
        log.info("%s", reports[-1].line())
    return reports


def check_request(source: str | Path, fmt_name: str, out: Path) -> tuple[ExportFormat, str]:
    """The format and the source folder, or one clear error, before any model is loaded."""
    fmt = export_format(fmt_name)
    if out.exists():
        raise ExportError(f"--out {str(out)!r} already exists; give a new path or remove it first")
    if not out.parent.exists():
        raise ExportError(f"the folder of --out {str(out)!r} does not exist")
    folder = resolve_model_path(str(source))
    if not Path(folder).is_dir():
        raise ExportError(f"{str(source)!r} is not a local model folder; export a folder written by `gisp prune`")
    return fmt, folder


def export_folder(source: str | Path, fmt_name: str, out: str | Path, options: ExportOptions | None = None) -> ExportReport:
    """Write the model in ``source`` (a pruned or dense model folder) to ``out`` in the format ``fmt_name``."""
    options = options or ExportOptions()
    out = Path(out)
    fmt, folder = check_request(source, fmt_name, out)
    model, _ = load_model(folder, device="cpu", dtype="float32")
    fmt.check(model, options)
    return write_atomically(fmt, model, Path(folder), out, options)


def write_atomically(fmt: ExportFormat, model, folder: Path, out: Path, options: ExportOptions) -> ExportReport:
    """``fmt.write`` into a temporary name beside ``out``, renamed when complete; removed on any error or stop.

    A folder format also gets ``export.json``: the report and the source folder's pruning record.
    """
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        report = fmt.write(model, folder, partial, options)
        report.path = out
        if not fmt.single_file:
            record = folder / "pruning.json"
            source_record = json.loads(record.read_text()) if record.exists() else None
            payload = {**report.record(), "source": str(folder), "pruning": source_record}
            (partial / REPORT_FILE).write_text(json.dumps(payload, indent=1))
        partial.replace(out)
    except BaseException:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise
    return report
