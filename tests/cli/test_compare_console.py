"""What `gisp compare` shows on a console: one progress bar, one line per row, the table at the end; lm-eval's
and transformers' logs and bars only with -v. Run as a real process, so what is checked is what a user sees
(in-process, pytest's own log handlers would hide the logging)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from tests.evaluation.test_lm_eval_bridge import TINY_TASK as TASK
from tests.tiny import tiny_folder

WORDS = ("structured", "pruning", "removes", "attention", "heads", "channels", "from", "a", "language", "model")
ROW = re.compile(r"^(dense|\w+ @ \d+%).*\((evaluated in \d+ s|cached)\)$")  # a finished row's line
LIBRARY_NOISE = ("Running loglikelihood requests", "Building contexts", "Selected tasks", "Loading weights", "INFO ")


@pytest.fixture(scope="module")
def config(tmp_path_factory, tokenizer):
    """A comparison of two methods at one target with perplexity and an lm-eval task on local data."""
    root = tmp_path_factory.mktemp("console")
    model_dir, text = tiny_folder(root, "llama", tokenizer)
    rng = random.Random(0)
    rows = [
        {"question": " ".join(rng.sample(WORDS, 4)), "choices": [rng.choice(WORDS) for _ in range(3)], "label": rng.randrange(3)}
        for _ in range(6)
    ]
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=tasks / "data.jsonl"))
    values = {
        "model": str(model_dir),
        "methods": ["magnitude", "random"],
        "sparsities": [0.3],
        "evals": [f"perplexity:source=file:{text},seqlen=16,max_windows=4", f"lm_eval:tasks=tiny_mc,include_path={tasks}"],
        "calibration": f"file:{text}",
        "n_samples": 4,
        "seqlen": 16,
    }
    path = root / "comparison.json"
    path.write_text(json.dumps(values))
    return path


def _compare(config, out, *flags) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "gisp_plugin", *flags, "compare", "--config", str(config), "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _lines(stream: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]", stream) if line.strip()]


def test_quiet_by_default_one_line_per_row_table_at_the_end(config, tmp_path):
    done = _compare(config, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    err = _lines(done.stderr)
    noise = [line for line in err if any(word in line for word in LIBRARY_NOISE)]
    assert not noise, noise[:5]
    assert [m.group(1) for m in map(ROW.match, err) if m] == ["dense", "magnitude @ 30%", "random @ 30%"]
    assert any("3/3" in line and "row" in line for line in err)  # the one bar reached its end
    assert done.stdout.startswith("# Comparison on")  # results only on stdout, the table first
    assert "| magnitude |" in done.stdout and "±" in done.stdout


def test_verbose_shows_the_libraries_logs_and_bars(config, tmp_path):
    done = _compare(config, tmp_path / "out", "-v")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Running loglikelihood requests" in done.stderr  # lm-eval's per-request bar
    assert re.search(r"^INFO .*Building contexts", done.stderr, re.MULTILINE)  # lm-eval's log
    assert "| magnitude |" in done.stdout
