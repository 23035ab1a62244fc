"""The study scripts (benchmarks/study_*.py): --help, and the whole path on a tiny model through the harness."""

import json
import sys
from pathlib import Path

import pytest

from tests.tiny import tiny_folder

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import study_ablations  # noqa: E402
import study_claims  # noqa: E402
import study_cost  # noqa: E402
import study_methods  # noqa: E402
from study_runs import Variant, load_base, results_folder, variant_config  # noqa: E402


@pytest.mark.parametrize("script", [study_claims, study_ablations, study_cost, study_methods])
def test_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_quality_config_parses_and_names_the_seven_tasks():
    base = load_base(None)
    assert base.methods[:8] == ["gisp", "wanda_sp", "flap", "llm_pruner", "magnitude", "random", "shortgpt", "owl_sp"]
    assert base.methods[8:] == ["sleb", "blockpruner", "slimgpt", "minitron"]
    assert base.sparsities == [0.2, 0.3, 0.4, 0.5]
    tasks = next(e for e in base.evals if e.startswith("lm_eval:"))
    for task in ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"):
        assert task in tasks


def test_variants_share_the_quality_folder_only_with_the_same_calibration(tmp_path):
    base = load_base(None)
    same = variant_config(base, Variant("one-shot", "gisp", {"steps": "1"}))
    assert same.methods == ["gisp"] and same.method_options == {"gisp": {"steps": "1"}}
    assert results_folder(tmp_path, base, same) == tmp_path / "quality"
    other = variant_config(base, Variant("cmqa", "gisp", {"loss": "margin"}, {"calibration": "cmqa-offline"}))
    assert other.method_options["gisp"] == {"steps": base.method_options["gisp"]["steps"], "loss": "margin"}
    assert results_folder(tmp_path, base, other) == tmp_path / "runs-calibration=cmqa-offline"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("study")
    model_dir, text = tiny_folder(root, "llama", tokenizer)
    config = {
        "model": str(model_dir),
        "methods": ["gisp", "wanda_sp", "magnitude"],
        "method_options": {"gisp": {"steps": "2", "batch_size": "4"}},
        "sparsities": [0.2, 0.4],
        "evals": [f"perplexity:source=file:{text},seqlen=16,max_windows=4"],
        "calibration": f"file:{text}",
        "n_samples": 8,
        "seqlen": 16,
    }
    path = root / "tiny.json"
    path.write_text(json.dumps(config))
    return root, path


def test_claims_a_and_b_on_a_tiny_model(tiny_study, capsys):
    root, config = tiny_study
    out = root / "out"
    assert study_claims.main(["--config", str(config), "--out", str(out), "--claims", "a,b", "--at", "0.4", "--high", "0.4"]) == 0
    saved = json.loads((out / "claims.json").read_text())
    assert saved["a"]["one_shot"] == "gisp steps=1" and set(saved["a"]["per_target"]) == {"0.20", "0.40"}
    assert saved["a"]["verdict"].startswith(("replicated", "not replicated"))
    assert "wanda_sp@0.40" in saved["b"]["pairs"]
    assert set(saved["b"]["blocks"]) == {"gisp", "wanda_sp"}
    for blocks in saved["b"]["blocks"]["gisp"].values():
        assert 0 <= blocks["attention"]["removed"] <= 1 and 0 < blocks["mlp"]["removed"] <= 1
    assert (out / "quality" / "cache" / "prune").is_dir()  # the one-shot run shares the quality folder
    assert "Claim (a)" in capsys.readouterr().out


def test_ablations_normalize_reports_block_shares(tiny_study):
    root, config = tiny_study
    out = root / "out"
    argv = ["--config", str(config), "--out", str(out), "--ablations", "normalize", "--normalize", "reference,none"]
    assert study_ablations.main(argv) == 0
    saved = json.loads((out / "ablations.json").read_text())
    blocks = saved["normalize"]["blocks"]
    for key in ("normalize=reference@0.40", "normalize=none@0.40"):
        shares = blocks[key]
        assert shares["attention"]["share_of_pruned"] + shares["mlp"]["share_of_pruned"] == pytest.approx(1.0, abs=1e-12)
        assert shares["attention"]["pruned"] + shares["mlp"]["pruned"] > 0
    assert (out / "plots" / "ablation_normalize_layers.png").read_bytes()[:4] == b"\x89PNG"


def test_cost_measures_every_part_on_a_tiny_model(tiny_study):
    root, config = tiny_study
    out = root / "cost"
    argv = ["--config", str(config), "--out", str(out), "--speed-methods", "magnitude", "--batch", "1", "--seqlen", "8"]
    argv += ["--repeats", "1", "--decode-tokens", "2", "--bare-repeats", "1", "--memory-repeats", "2"]
    assert study_cost.main(argv) == 0
    saved = json.loads((out / "cost.json").read_text())
    assert [t["method"] for t in saved["time"]] == ["gisp", "wanda_sp", "magnitude"]
    assert all(t["prune_time_s"] > 0 for t in saved["time"])
    for probe in saved["memory"]:
        assert probe["peak_bytes"] >= probe["loaded_bytes"] > 0
    assert saved["ratio"]["step_over_bare"] > 0 and saved["ratio"]["tokens"] == 8 * 16
    speeds = {(r["method"], r["target"]) for r in saved["speed"]}
    assert speeds == {("dense", 0.0), ("magnitude", 0.2), ("magnitude", 0.4)}
    assert all(r["tokens_per_s"] > 0 for r in saved["speed"])


def test_without_tasks_recomputes_the_mean_and_its_error_over_the_kept_tasks():
    from study_runs import mean_acc_stderr, without_tasks

    from gisp_plugin.harness.runner import Row

    tasks = {
        "boolq": {"acc": 0.9, "acc_stderr": 0.04, "mean_uses": "acc"},
        "piqa": {"acc": 0.5, "acc_norm": 0.6, "acc_norm_stderr": 0.03, "mean_uses": "acc_norm"},
        "arc_easy": {"acc": 0.4, "acc_stderr": 0.04, "mean_uses": "acc"},
    }
    metrics = {"mean_acc": 0.7, "acc_stderr[boolq]": 0.04, "acc_norm_stderr[piqa]": 0.03, "acc_stderr[arc_easy]": 0.04}
    row = Row("gisp", 0.5, 0.5, metrics, {"lm_eval:tasks=...": {"evaluator": "lm_eval", "tasks": tasks}})
    kept = without_tasks(row, frozenset({"boolq"}), "label")
    assert kept.method == "label" and kept.metrics["mean_acc"] == pytest.approx(0.5)
    assert mean_acc_stderr(kept) == pytest.approx((0.03**2 + 0.04**2) ** 0.5 / 2)
    assert row.metrics["mean_acc"] == 0.7 and "boolq" in tasks  # the original is untouched
    assert without_tasks(row, frozenset()).metrics["mean_acc"] == 0.7


def test_new_methods_against_gisp_on_a_tiny_model(tiny_study, capsys):
    """study_methods.py: every row beside GISP's at the same target, the difference and its error computed
    from the rows' own perplexities and standard errors."""
    root, config = tiny_study
    out = root / "methods"
    study_methods.main(["--config", str(config), "--out", str(out), "--variants", "gisp,gisp+hidden,slimgpt"])
    saved = json.loads((out / "methods.json").read_text())
    rows = {(r["label"], r["target"]): r for r in saved["rows"][1:]}
    assert {label for label, _ in rows} == {"gisp", "gisp+hidden", "slimgpt"}
    assert len(saved["against_gisp"]) == 4  # gisp+hidden and slimgpt at 20% and 40%
    for diff in saved["against_gisp"]:
        gisp = rows[("gisp", diff["target"])]
        assert diff["ppl_minus_gisp"] == pytest.approx(diff["ppl"] - gisp["ppl"], rel=1e-12)
        assert diff["ppl_minus_gisp_se"] > 0
    assert "Against GISP at the same target" in capsys.readouterr().out
