"""A log handler that records the GISP steps a run in this process computes, and can stop it after one."""

from __future__ import annotations

import logging


class GispSteps(logging.Handler):
    """The GISP steps a run computes (its ``gisp step k/N`` lines) and its resume line; with ``stop_after``, a
    Ctrl-C right after that step is computed and its state saved, as a user interrupting the run there would give."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.stop_after, self.computed, self.resumed = stop_after, [], []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("gisp: resuming from"):
            self.resumed.append(message)
        if message.startswith("gisp step "):
            self.computed.append(int(message.split()[2].split("/")[0]))
            if self.computed[-1] == self.stop_after:
                raise KeyboardInterrupt
