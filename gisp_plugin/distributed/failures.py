"""When one rank of a ``torchrun`` job fails: how the others stop, and who says what.

A rank that raises exits with an error; torchrun notices and sends SIGTERM to every other rank, and a
rank blocked in a collective sees the collective fail at once (gloo: "connection closed by peer"). Under
torchrun, ``sigterm_raises`` turns that SIGTERM into ``JobStopped``, so cleanup runs as for any error:
rank 0 removes a run folder that holds nothing yet, and a model being saved is never left half-written.

``error_line`` decides what each rank prints, so the user reads one clear line on rank 0 and not a
copy per rank: rank 0 reports its own errors, and a failure elsewhere as one line; another rank reports
only what is its own (a failure on its share of the data, a missing file on its node), tagged with its
rank, and stays silent on the input checks every rank repeats before the job starts and on the echo of
another rank's failure.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterator

import torch.distributed as dist

from gisp_plugin.distributed.context import launch_rank, launched_by_torchrun


class JobStopped(RuntimeError):
    """torchrun stopped this rank (SIGTERM), because another rank of the job failed."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Under torchrun, SIGTERM raises ``JobStopped`` while the body runs (outside torchrun: nothing changes)."""
    if not launched_by_torchrun():
        yield
        return

    def stop(signum, frame) -> None:
        raise JobStopped("torchrun stopped this rank")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def caused_elsewhere(err: BaseException) -> bool:
    """Whether ``err`` is this rank's echo of another rank's failure: torchrun's stop, or a collective that
    failed because a peer is gone (gloo raises a plain ``RuntimeError`` naming the peer; NCCL a ``DistError``)."""
    if isinstance(err, (JobStopped, dist.DistError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("gloo" in text or "by peer" in text)


def error_line(command: str, message: str, err: BaseException) -> str | None:
    """The line this rank prints for ``err`` (``message`` is its one-line text), or ``None`` to say nothing."""
    rank = launch_rank()
    elsewhere = caused_elsewhere(err)
    if rank == 0:
        if elsewhere:
            return (
                f"gisp {command}: error: another rank of this torchrun job failed or was killed, so the job stopped "
                f"({_reason(err)}); that rank's own error, if it could print one, is above"
            )
        return f"gisp {command}: error: {message}"
    joined = dist.is_available() and dist.is_initialized()
    if elsewhere or (not joined and isinstance(err, (ValueError, LookupError))):
        return None
    return f"gisp {command}: error: [rank {rank}] {message}"


def _reason(err: BaseException) -> str:
    """What rank 0 saw of another rank's failure, in a few words (the collective's first sentence)."""
    text = " ".join(str(err).split())
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo prefixes its source file and line
    return text.split(". ")[0].rstrip(".") or type(err).__name__
