"""`gisp compare` with bad config files, a damaged cache and a resumed run (issue 11)."""

import json
import logging
import time

import pytest

from gisp_plugin.cli import main
from gisp_plugin.harness.config import ComparisonConfig, ConfigError
from gisp_plugin.harness.runner import SETTINGS_FILE, run_comparison
from gisp_plugin.methods import gisp
from tests.tiny import tiny_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    return tiny_folder(tmp_path_factory.mktemp("compare-errors"), "llama", tokenizer)


def _values(model_dir, text, **overrides) -> dict:
    values = dict(
        model=str(model_dir),
        methods=["magnitude"],
        sparsities=[0.2],
        evals=[f"perplexity:source=file:{text},seqlen=16,max_windows=4"],
        calibration=f"file:{text}",
        n_samples=4,
        seqlen=16,
    )
    values.update(overrides)
    return values


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("n_samples: eight", "n_samples must be a whole number, got 'eight'"),
        ("seed: [1, 2]", "seed must be a whole number, got [1, 2]"),
        ("method_options: 5", "method_options must map method names to options"),
        ("method_options: {gisp: 5}", "method_options['gisp'] must be a mapping"),
        ("method_options: {gisp: {steps: [1, 2]}}", "option steps=[1, 2] must be a single value"),
        ("sparsities: 'a,b'", "sparsities 'a,b' must be numbers"),
        ("save_models: maybe", "save_models must be true or false"),
        ("pad_to: 0", "pad_to must be >= 1"),
        ("device: gpu7", "unknown device 'gpu7'"),
    ],
)
def test_wrong_types_in_a_config_file_are_one_line(setup, tmp_path, capsys, line, message):
    model_dir, text = setup
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {model_dir}\ncalibration: 'file:{text}'\n{line}\n")
    out = tmp_path / "out"
    assert main(["compare", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_failed_run_leaves_nothing_that_blocks_the_corrected_config(setup, tmp_path, capsys):
    model_dir, text = setup
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "out"
    bad = _values(model_dir, text, methods=["magnitude", "wanda_sp"], calibration=f"file:{short}")
    config = tmp_path / "c.json"
    config.write_text(json.dumps(bad))
    assert main(["compare", "--config", str(config), "--out", str(out)]) == 2
    assert "a window of seqlen=16 needs at least 17" in capsys.readouterr().err
    assert not (out / SETTINGS_FILE).exists()
    config.write_text(json.dumps(_values(model_dir, text, methods=["magnitude", "wanda_sp"])))
    assert main(["compare", "--config", str(config), "--out", str(out)]) == 0


def test_settings_without_results_do_not_block(setup, tmp_path):
    model_dir, text = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / SETTINGS_FILE).write_text(json.dumps({"identity": {"model": "another", "seed": 5}}))
    result = run_comparison(ComparisonConfig.from_mapping(_values(model_dir, text)), out)
    assert [row.method for row in result.rows] == ["dense", "magnitude"]
    assert json.loads((out / SETTINGS_FILE).read_text())["identity"]["seed"] == 0
    with pytest.raises(ConfigError, match="different configuration"):  # now it holds results: a change is refused
        run_comparison(ComparisonConfig.from_mapping(_values(model_dir, text, seed=3)), out)


def test_damaged_cache_entries_are_named_dropped_and_recomputed(setup, tmp_path, caplog):
    model_dir, text = setup
    out = tmp_path / "out"
    config = ComparisonConfig.from_mapping(_values(model_dir, text, methods=["flap"]))
    first = run_comparison(config, out)
    tensors = next((out / "cache" / "prune").glob("*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])
    evaluation = next((out / "cache" / "eval").glob("*.json"))
    evaluation.write_text(evaluation.read_text()[:40])
    with caplog.at_level(logging.WARNING, logger="gisp_plugin.harness.cache"):
        again = run_comparison(config, out)
    assert str(tensors) in caplog.text and str(evaluation) in caplog.text and "dropping it" in caplog.text
    assert [c.cached for c in again.costs] == [False]
    assert [r.metrics for r in again.rows] == [r.metrics for r in first.rows]
    assert len(tensors.read_bytes()) > 100  # written again, whole


def test_pruning_time_counts_the_steps_before_a_resume(setup, tmp_path, monkeypatch):
    model_dir, text = setup
    config = ComparisonConfig.from_mapping(
        _values(model_dir, text, methods=["gisp"], method_options={"gisp": {"steps": "4", "protect": "none"}}, sparsities=[0.4])
    )
    real = gisp.accumulate_gradients
    calls = []

    def slow_then_killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during step 3
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(gisp, "accumulate_gradients", slow_then_killed)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_comparison(config, out)
    monkeypatch.setattr(gisp, "accumulate_gradients", real)
    resumed = run_comparison(config, out)
    # two slow steps finished before the interruption; the resumed part alone is far quicker
    assert resumed.costs[0].prune_time_s >= 2.0


def test_export_formats_are_checked_as_gisp_prune_checks_them():
    """``--export gguf,hf`` is two formats for compare as for prune (one check, ``check_export_formats``)."""
    assert ComparisonConfig.from_mapping({"save_models": True, "export": "gguf,hf"}, "command line").export == ["gguf", "hf"]
    assert ComparisonConfig(save_models=True, export=["hf"]).export == ["hf"]
    with pytest.raises(LookupError, match="unknown export format 'ggfu'; available: gguf, hf"):
        ComparisonConfig.from_mapping({"save_models": True, "export": "ggfu"}, "command line")
