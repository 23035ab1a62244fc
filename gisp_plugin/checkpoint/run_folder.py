"""The output folder of one ``gisp prune`` run: whose it is, and when a new run may write to it.

A run writes ``run.json`` (its request when it starts, its results when it ends), one folder per
target, the trajectory of a nested method and a ``.work`` folder of resumable state. Rerunning the
same request into the same folder resumes it (GISP continues from its last finished step). A folder
holding a different run, or files that are no run at all, is refused before anything is loaded, so
no run's records are mixed with or overwritten by another's. With ``overwrite`` the new run is built
in a hidden folder beside the old one and swapped in only when complete: until then the old run stays
whole, and an interrupted overwrite leaves it untouched. While a run is checked and written, its process
holds the folder's lock (``checkpoint.locking``): a second run into the same ``--out`` is refused with
the first one named, so two runs never mix their records or share a staging folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gisp_plugin.checkpoint.locking import hold_folder
from gisp_plugin.inputs import InputError, check_output_folder

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
RUN_FORMAT = "gisp-prune-run/1"


class RunFolderError(InputError):
    """An output folder that holds another run or foreign files."""


def _read_run(folder: Path) -> dict[str, Any] | None:
    try:
        run = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return run if isinstance(run, dict) else None


def _looks_like_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds what some ``gisp prune`` run writes (of this version or an older one)."""
    return (
        (folder / RUN_FILE).exists()
        or (folder / "trajectory.json").exists()
        or any((child / "pruning.json").exists() for child in folder.iterdir() if child.is_dir())
    )


def _describe(request: dict[str, Any]) -> str:
    targets = ",".join(str(t) for t in request.get("targets", []))
    return f"{request.get('method')} on {request.get('model')} at {targets}"


@dataclass
class RunFolder:
    """Where a run writes (``path``: ``out`` itself, or a staging folder while overwriting)."""

    out: Path
    path: Path
    request: dict[str, Any]
    lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def staging(self) -> bool:
        return self.path != self.out

    def release(self) -> None:
        """Let go of the folder's lock (the run is over: finished, failed or stopped)."""
        self.lock.close()

    def final_path(self, written: Path) -> Path:
        """Where something written under ``path`` will be once the run is finished."""
        return self.out / Path(written).relative_to(self.path)

    def _write(self, status: str, results: list[dict[str, Any]]) -> None:
        payload = {"format": RUN_FORMAT, "status": status, "request": self.request, "results": results}
        # older readers find model, method and options at the top level, as before
        payload.update({k: self.request[k] for k in ("model", "method", "options")})
        tmp = self.path / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(self.path / RUN_FILE)

    def start(self) -> None:
        """Claim the folder: ``run.json`` records the request before any result is written (when overwriting,
        in a fresh staging folder: an earlier, interrupted overwrite's is removed first)."""
        if self.staging:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self._write("running", [])

    def abandon_if_empty(self) -> None:
        """Undo ``start()`` when the run failed before writing anything of value (no model, no state)."""
        if not self.path.is_dir():
            return
        leftovers = [p for p in self.path.iterdir() if p.name not in (RUN_FILE, ".work")]
        work = self.path / ".work"
        if leftovers or (work.is_dir() and any(work.iterdir())):
            return  # finished models or resumable state: keep them
        run = _read_run(self.path)
        if run is None or run.get("status") != "running" or run.get("results"):
            return
        shutil.rmtree(self.path, ignore_errors=True)

    def finish(self, results: list[dict[str, Any]]) -> None:
        """Record the results; when overwriting, swap the finished run in for the old folder."""
        self._write("finished", results)
        if not self.staging:
            return
        old = self.out.with_name(f".{self.out.name}.replaced-{os.getpid()}")
        if self.out.exists():
            self.out.rename(old)
        self.path.rename(self.out)
        shutil.rmtree(old, ignore_errors=True)
        log.info("replaced %s with the new run", self.out)


def open_run_folder(out: str | Path, request: dict[str, Any], overwrite: bool = False, lock: bool = True) -> RunFolder:
    """Check ``out`` for a run of ``request`` and say where to write; refuse another run's folder, and a
    folder another process is writing now.

    With ``lock`` (the process that will write) the folder's lock is taken before the folder is read and
    held until ``release()``. Nothing is written here (under torchrun every rank checks, rank 0 alone
    locks and writes): the caller calls ``start()`` once everything else is checked.
    """
    out = check_output_folder(out, "--out folder")
    stack = contextlib.ExitStack()
    if lock:
        stack.enter_context(hold_folder(out))
    try:
        folder = _run_folder(out, request, overwrite)
    except BaseException:
        stack.close()
        raise
    folder.lock = stack
    return folder


def _run_folder(out: Path, request: dict[str, Any], overwrite: bool) -> RunFolder:
    """Where a run of ``request`` writes into ``out`` (whose lock this process holds, or a rank-0 peer does)."""
    if not out.exists() or not any(out.iterdir()):
        return RunFolder(out, out, request)
    earlier = _read_run(out)
    same = earlier is not None and earlier.get("format") == RUN_FORMAT and earlier.get("request") == request
    if same and not overwrite:
        log.info("%s holds this same run (%s): resuming it", out, earlier.get("status"))
        return RunFolder(out, out, request)
    if not _looks_like_a_run(out):
        raise RunFolderError(f"--out folder {str(out)!r} is not empty and holds no gisp prune run; choose a new or empty folder")
    if overwrite:
        return RunFolder(out, out.with_name(f".{out.name}.overwrite"), request)
    if earlier is not None and earlier.get("format") == RUN_FORMAT:
        theirs = earlier.get("request", {})
        changed = sorted(k for k in set(theirs) | set(request) if theirs.get(k) != request.get(k))
        what = f"another run ({_describe(theirs)}; {', '.join(changed)} differ)"
    else:
        what = "the results of an earlier gisp prune run"
    raise RunFolderError(f"--out folder {str(out)!r} holds {what}; choose another --out, or pass --overwrite to replace it")
