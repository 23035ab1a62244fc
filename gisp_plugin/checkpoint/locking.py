"""One writer per folder: an OS file lock beside the folder, held while a command writes into it.

Two ``gisp prune`` (or ``gisp compare``) runs into one ``--out`` at the same time would both pass the
"same run / different run" check and leave a mixed folder, or share an ``--overwrite`` staging folder.
``hold_folder`` takes an exclusive ``flock`` on ``.NAME.lock`` next to the folder (next to, not inside:
an ``--overwrite`` run builds a staging folder and swaps it in, so the lock must outlive both folders).
The lock file records who holds it (pid, host, command, start time), so a second writer is refused with
one line naming the running one. The kernel drops a ``flock`` when its process dies however it dies
(SIGKILL, a power cut on a local disk): a lock file left by a dead process is taken over silently.

Locks are re-entrant within a process (a command and the library call it makes may both hold the same
folder) and removed when the last holder lets go. A shared cache that several commands fill (the
converted default model) waits for the lock instead of refusing (``wait=True``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gisp_plugin.inputs import InputError, check_output_folder

log = logging.getLogger(__name__)


class FolderBusyError(InputError):
    """Another live process holds the lock of the folder this command would write."""


@dataclass
class _Held:
    fd: int
    count: int


_HELD: dict[Path, _Held] = {}  # lock file -> this process's hold on it


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: ``.NAME.lock`` in its parent folder."""
    folder = Path(folder).expanduser().absolute()
    return folder.parent / f".{folder.name}.lock"


def _holder_text(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 65536).decode())
        command = holder["command"]
        if len(command) > 160:
            command = command[:157] + "..."
        return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}: {command}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is still starting"  # the holder locked the file but has not written it yet


def _acquire(path: Path, what: str, folder: Path, fix: str, wait: bool) -> int:
    """An fd holding the exclusive lock on ``path`` (a file no releasing holder has unlinked meanwhile)."""
    check_output_folder(folder, what)  # a file, or a place that cannot be written, is named as such
    path.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            if not wait:
                busy = f"{what} {str(folder)!r} is being written by another gisp process ({holder}); {fix}"
                raise FolderBusyError(busy) from None
            if not told:
                log.info("waiting for %s to finish writing %s", holder, folder)
                told = True
            time.sleep(0.5)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed this file after we opened it: lock the current one


def _command() -> str:
    """This process's command line as the user typed it (``gisp prune ...``)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if name == "__main__.py":  # python -m gisp_plugin (torchrun too)
        name = f"python -m {Path(sys.argv[0]).parent.name}"
    return shlex.join([name, *sys.argv[1:]])


@contextlib.contextmanager
def hold_folder(
    folder: str | Path,
    what: str = "--out folder",
    fix: str = "wait for it to finish, or choose another --out",
    wait: bool = False,
) -> Iterator[Path]:
    """Hold the write lock of ``folder`` while the body runs; refuse (or with ``wait``, wait) when another
    process holds it. Yields the lock file's path."""
    path = lock_path(folder)
    held = _HELD.get(path)
    if held is None:
        fd = _acquire(path, what, Path(folder), fix, wait)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": _command(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        held = _HELD[path] = _Held(fd, 0)
    held.count += 1
    try:
        yield path
    finally:
        held.count -= 1
        if held.count == 0:
            del _HELD[path]
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: a waiter that opened it sees a removed file and retries
            os.close(held.fd)
