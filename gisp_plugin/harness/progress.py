"""What a running comparison shows: one progress bar over its rows and one line per finished row.

The bar (tqdm) counts rows done out of all rows (the dense model, then every method at every target),
names the method and target being pruned or evaluated, and estimates the time left from the rows done
so far. Each finished row is written above the bar as one line (``report.row_line``). Without a bar
(the Python API's default) the same lines go to the log.
"""

from __future__ import annotations

import logging
from typing import TextIO

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class ComparisonProgress:
    """Progress of one comparison: a tqdm bar on ``file`` (``bar=True``) or log lines (``bar=False``)."""

    def __init__(self, bar: bool = False, file: TextIO | None = None):
        self.bar = bar
        self.file = file
        self._tqdm: tqdm | None = None

    def start(self, total_rows: int) -> None:
        if self.bar:
            self._tqdm = tqdm(total=total_rows, unit="row", file=self.file, dynamic_ncols=True)

    def stage(self, text: str) -> None:
        """The step now running, e.g. ``gisp 20%, 40%: pruning``."""
        if self._tqdm is not None:
            self._tqdm.set_description_str(text)
        else:
            log.info("%s", text)

    def row_done(self, line: str) -> None:
        """One finished row: its line above the bar, and one more row counted."""
        if self._tqdm is not None:
            self._tqdm.write(line, file=self.file)
            self._tqdm.update(1)
        else:
            log.info("%s", line)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
