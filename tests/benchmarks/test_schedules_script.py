"""benchmarks/schedules.py: --help, the GISP options it passes per schedule, and its table."""

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import schedules  # noqa: E402


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        schedules.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--schedules" in capsys.readouterr().out


def test_each_schedule_gets_only_its_own_knob():
    args = Namespace(batch_size=2, exp_alpha=-1.5, adaptive_limit=3.0)
    assert schedules.gisp_options(args, "linear", 4) == {"steps": "4", "batch_size": "2", "schedule": "linear"}
    assert schedules.gisp_options(args, "exponential", 4)["exp_alpha"] == "-1.5"
    assert schedules.gisp_options(args, "adaptive", 8)["adaptive_limit"] == "3.0"


def test_table_marks_the_best_perplexity_per_step_count(capsys):
    def run(schedule, steps, ppl):
        return {"schedule": schedule, "steps": steps, "ppl": {"0.30": ppl}, "passes": [{"end": 0.3}], "pruning_s": 1.0}

    setup = {"model": "m", "device": "cpu", "dtype": "float32", "calibration": "c", "perplexity_on": "p", "targets": [0.3]}
    results = {
        "setup": setup,
        "dense_ppl": 20.0,
        "runs": [run("adaptive", 4, 90.0), run("linear", 4, 80.0), run("linear", 8, 70.0)],
    }
    schedules.print_table(results)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4") or line.startswith("| 8")]
    assert rows == [
        "| 4 | linear | **80.0** | 0.30 | 1 |",
        "| 4 | adaptive | 90.0 | 0.30 | 1 |",
        "| 8 | linear | 70.0 | 0.30 | 1 |",
    ]
