"""Peak memory of a stretch of work: the CUDA allocator's peak, or the process's peak RSS on CPU.

On Linux the kernel's peak-RSS counter can be reset (``/proc/self/clear_refs`` = 5), so the CPU peak
belongs to the measured stretch alone (it includes what was resident before it, such as the model).
``PeakSampler`` instead samples the resident memory in a thread, for benchmarks that must not reset the
kernel's counter (several stretches measured in one process).
"""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path

import torch


def _reset_peak_rss() -> bool:
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set since the last reset (or since start where resets are impossible)."""
    status = Path(f"/proc/{os.getpid()}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory(model) as m: ...`` then ``m.peak_bytes``; CUDA when the model lives there."""

    def __init__(self, model: torch.nn.Module | None = None, device: torch.device | str | None = None):
        if device is None and model is not None:
            device = next(model.parameters()).device
        self.device = torch.device(device or "cpu")
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = peak_rss_bytes()


def resident_bytes() -> int:
    """The process's resident memory now (``/proc/self/statm``)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples resident memory in a background thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())
