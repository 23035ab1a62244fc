"""What the FSDP worker and the one-process reference both run: the same data, targets and options."""

from __future__ import annotations

from gisp_plugin.data.api import CalibrationSet
from tests.tiny import random_ids

TARGETS = [0.2, 0.4]
# 5 samples in batches of 2 over 2 ranks: rank 0 runs one batch, rank 1 two (the padding round is tested)
GISP_OPTIONS = {"steps": 3, "protect": "none", "batch_size": 2}


def calibration(n: int = 5) -> CalibrationSet:
    ids = random_ids(n, 16, seed=1)
    return CalibrationSet("random", [ids[i, : 10 + i] for i in range(n)])


def probe_ids():
    return random_ids(2, 12, seed=7)
