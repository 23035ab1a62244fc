"""Launching ``torchrun`` with 2 CPU (gloo) ranks from a test, the way a user launches a job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def torchrun_command(*args: str, ranks: int = 2) -> list[str]:
    """``torchrun --standalone`` (a free local port, so parallel test runs never collide) with ``args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *map(str, args)]


def torchrun_env() -> dict[str, str]:
    """The test's environment, with this checkout (and its baselines) importable by every rank."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "baselines"), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a 2-rank job to its end; stdout and stderr captured as text."""
    return subprocess.run(
        torchrun_command(*args), env=torchrun_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def error_lines(stderr: str, command: str) -> list[str]:
    """The one-line errors ``gisp COMMAND`` printed (torchrun's own failure report aside)."""
    return [line for line in stderr.splitlines() if line.startswith(f"gisp {command}: error:")]
