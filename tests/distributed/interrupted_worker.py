"""``gisp prune`` on one rank of a torchrun job, stopped as Ctrl-C stops it right after GISP step STOP is saved.

``torchrun --nproc-per-node N -m tests.distributed.interrupted_worker STOP [gisp arguments...]`` runs the
command line with ``gisp_plugin.cli.main`` on every rank. When a rank logs ``gisp step STOP/...`` (the line
GISP logs once the step is computed and rank 0 has saved its state) the ranks meet at a barrier, so rank 0's
state is on disk, and every rank raises ``KeyboardInterrupt`` there: the run stops with step STOP finished,
as a user's Ctrl-C delivered to every rank at that moment would stop it, without racing a real signal.
"""

from __future__ import annotations

import logging
import sys

import torch.distributed as dist

from gisp_plugin.cli import main


class StopAfter(logging.Handler):
    def __init__(self, step: int) -> None:
        super().__init__(logging.DEBUG)
        self.step = step

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("gisp step ") and int(message.split()[2].split("/")[0]) == self.step:
            dist.barrier()  # rank 0 logs the step after saving its state: every rank waits for that
            raise KeyboardInterrupt


if __name__ == "__main__":
    logger = logging.getLogger("gisp_plugin.methods.gisp")
    logger.addHandler(StopAfter(int(sys.argv[1])))
    logger.setLevel(logging.DEBUG)
    sys.exit(main(sys.argv[2:]))
