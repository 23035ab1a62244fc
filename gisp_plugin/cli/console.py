"""What the command line prints besides its results: log levels, and the other libraries kept quiet.

By default the console shows this package's messages (``INFO``; ``WARNING`` and up while a progress
display speaks for it) and only errors from the libraries it drives: lm-eval, transformers, datasets
and the hub log every request and task at ``INFO`` and draw a progress bar per task, per request batch
and per weight file. ``quiet_libraries`` also sends what those libraries write straight to stderr (their
tqdm bars) to nowhere while a command runs, so one progress display is all that moves. ``-v`` shows
everything: every logger at ``DEBUG`` and every bar.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from tqdm.contrib.logging import logging_redirect_tqdm

from gisp_plugin.distributed.context import launch_rank

LOG_FORMAT = "%(levelname)s %(message)s"
OWN_LOGGER = "gisp_plugin"
# Loggers of the libraries the commands drive; quiet (errors only) unless -v.
LIBRARY_LOGGERS = (
    "lm_eval",
    "transformers",
    "datasets",
    "huggingface_hub",
    "accelerate",
    "evaluate",
    "py.warnings",
    "matplotlib",
    "urllib3",
    "filelock",
    "fsspec",
)


def configure_logging(verbose: bool, own_level: int = logging.INFO) -> None:
    """Root handler on stderr; this package at ``own_level``, the libraries at ``ERROR`` (all ``DEBUG`` with -v).

    Levels are set explicitly (not only through ``basicConfig``, which does nothing when the root logger
    already has a handler), so a second call in the same process switches back and forth. Under torchrun
    the ranks other than 0 log warnings and errors only, each line tagged with the rank.
    """
    rank = launch_rank()
    logging.basicConfig(format=LOG_FORMAT if rank == 0 else f"[rank {rank}] {LOG_FORMAT}")
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    if rank != 0 and not verbose:  # under torchrun rank 0 speaks for the job; the others only warn
        own_level = max(own_level, logging.WARNING)
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()  # weight loading, once per rank otherwise
        disable_progress_bars()
    logging.getLogger(OWN_LOGGER).setLevel(logging.DEBUG if verbose else own_level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    logging.captureWarnings(not verbose)  # Python warnings through the "py.warnings" logger: errors only


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """While the body runs: whatever is written to ``sys.stderr`` goes nowhere, log records still show.

    Progress bars of other libraries (lm-eval's per-task and per-request bars have no switch) write to
    ``sys.stderr``; log records go through the root handlers, which hold the real stream and write
    through ``tqdm.write`` so they do not tear a progress bar. Objects that took ``sys.stderr`` before
    (a progress bar made by the caller) keep writing to the console.
    """
    if not enabled:
        yield
        return
    with (
        logging_redirect_tqdm(),
        open(os.devnull, "w", encoding="utf-8") as sink,
        contextlib.redirect_stderr(sink),
    ):
        yield
    sys.stderr.flush()
