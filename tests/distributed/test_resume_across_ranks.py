"""A GISP run resumes on another number of ranks: started on 2 torchrun ranks and interrupted, it finishes in
one process; started in one process and interrupted, it finishes on 2 ranks.

Either way the resumed run reads the steps the first run saved (it logs that it resumes after 2 of 4 steps
and computes only steps 3 and 4) and prunes exactly the structures an uninterrupted run prunes. The
state's fingerprint holds the whole calibration set, not a rank's share, so it is the same on any number of
ranks; the ranks split only the gradient sums, which agree with one process to float32 rounding.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import pytest

from gisp_plugin.cli import main
from gisp_plugin.methods.gisp import STATE_FILE
from tests.distributed.launch import ROOT, torchrun_command, torchrun_env
from tests.gisp_steps import GispSteps
from tests.tiny import tiny_folder

# rank 0's log lines (the other rank's are tagged "[rank 1]"; a progress bar may precede a line)
STEP = re.compile(r"(\[rank 1\] )?DEBUG gisp step (\d+)/4:")
RESUMED = re.compile(r"(\[rank 1\] )?INFO gisp: resuming from (.*) after (\d+) of 4 steps")


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tokenizer):
    return tiny_folder(tmp_path_factory.mktemp("resume-ranks"), "llama", tokenizer)  # model folder, text file


def prune_args(dense, out: Path) -> list[str]:
    model_dir, text = dense
    return ["-v", "prune", "--model", str(model_dir), "--method", "gisp", "--sparsity", "0.2,0.4", "--out", str(out),
            "--device", "cpu", "--calibration", f"file:{text}", "--n-samples", "4", "--seqlen", "16",
            "-o", "steps=4", "-o", "protect=none"]  # fmt: skip


def rank_0(pattern: re.Pattern, stderr: str) -> list[tuple[str, ...]]:
    return [found[1:] for found in pattern.findall(stderr) if not found[0]]


def on_two_ranks(dense, out: Path, stop_after: int = 0) -> subprocess.CompletedProcess:
    """``gisp prune`` on 2 gloo ranks; with ``stop_after``, interrupted once that step is computed and saved."""
    command = torchrun_command("-m", "tests.distributed.interrupted_worker", str(stop_after), *prune_args(dense, out))
    return subprocess.run(command, env=torchrun_env(), cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)


def in_one_process(dense, out: Path, steps: GispSteps) -> int:
    logger = logging.getLogger("gisp_plugin.methods.gisp")
    logger.addHandler(steps)
    try:
        return main(prune_args(dense, out))
    finally:
        logger.removeHandler(steps)


def structures(out: Path) -> dict[str, dict]:
    return {t: json.loads((out / f"gisp-s{t}" / "pruning.json").read_text())["pruned_structures"] for t in ("0.20", "0.40")}


@pytest.fixture(scope="module")
def uninterrupted(dense, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("whole") / "out"
    steps = GispSteps()
    assert in_one_process(dense, out, steps) == 0
    assert steps.computed == [1, 2, 3, 4] and not steps.resumed
    return structures(out)


def test_a_run_interrupted_on_two_ranks_resumes_in_one_process(dense, uninterrupted, tmp_path):
    out = tmp_path / "out"
    first = on_two_ranks(dense, out, stop_after=2)
    assert first.returncode != 0, first.stderr[-3000:]
    assert "interrupted (Ctrl-C); finished results are kept" in first.stderr, first.stderr[-3000:]
    state = json.loads((out / ".work" / STATE_FILE).read_text())["trajectory"]["steps"]
    assert sorted({step["gradient_step"] for step in state}) == [0, 1]  # steps 1 and 2 done and saved, no more
    assert not list(out.glob("gisp-s*"))  # under torchrun the models are written at the end

    again = GispSteps()
    assert in_one_process(dense, out, again) == 0
    assert again.resumed == [f"gisp: resuming from {out / '.work'} after 2 of 4 steps"]
    assert again.computed == [3, 4]  # steps 1 and 2 were read from the 2 ranks' state, not redone
    assert structures(out) == uninterrupted
    assert json.loads((out / "gisp-s0.40" / "pruning.json").read_text())["distributed"]["world_size"] == 1


def test_a_run_interrupted_in_one_process_resumes_on_two_ranks(dense, uninterrupted, tmp_path):
    out = tmp_path / "out"
    first = GispSteps(stop_after=2)
    assert in_one_process(dense, out, first) == 130
    assert first.computed == [1, 2] and (out / ".work" / STATE_FILE).exists()

    again = on_two_ranks(dense, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert rank_0(RESUMED, again.stderr) == [(str(out / ".work"), "2")], again.stderr[-3000:]
    assert rank_0(STEP, again.stderr) == [("3",), ("4",)]  # steps 1 and 2 were read, not redone
    assert structures(out) == uninterrupted
    assert json.loads((out / "gisp-s0.40" / "pruning.json").read_text())["distributed"]["world_size"] == 2
