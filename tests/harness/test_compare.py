"""`gisp compare` on a tiny model: outputs, caching, invalidation and refusals."""

import csv
import json

import pytest

from gisp_plugin.cli import main
from gisp_plugin.harness.cache import ResultCache
from gisp_plugin.harness.config import ComparisonConfig, ConfigError
from gisp_plugin.harness.runner import resolve_methods, run_comparison
from tests.tiny import tiny_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("compare")
    model_dir, text = tiny_folder(root, "qwen2", tokenizer)
    return root, model_dir, text


def _config(model_dir, text, **overrides) -> ComparisonConfig:
    values = dict(
        model=str(model_dir),
        methods=["magnitude", "random", "gisp"],
        method_options={"gisp": {"steps": "2", "batch_size": "4"}},
        sparsities=[0.2, 0.4],
        evals=[f"perplexity:source=file:{text},seqlen=16,max_windows=8"],
        calibration=f"file:{text}",
        n_samples=8,
        seqlen=16,
    )
    values.update(overrides)
    return ComparisonConfig.from_mapping(values)


def test_compare_writes_table_csv_json_plots_and_reuses_cache(setup, tmp_path, capsys):
    _, model_dir, text = setup
    out = tmp_path / "results"
    config_file = tmp_path / "comparison.yaml"
    config = _config(model_dir, text)
    config_file.write_text(json.dumps(config.to_json()))  # JSON is valid YAML
    assert main(["compare", "--config", str(config_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| method | dense | 20% | 40% |" in printed

    table = (out / "table.md").read_text()
    metric = f"ppl[file:{text}@16]"
    assert f"## {metric}" in table and "| gisp |" in table and "## Cost of pruning" in table
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], float(r["target"])) for r in rows] == [
        ("dense", 0.0),
        ("magnitude", 0.2),
        ("magnitude", 0.4),
        ("random", 0.2),
        ("random", 0.4),
        ("gisp", 0.2),
        ("gisp", 0.4),
    ]
    assert all(float(r[metric]) > 1 for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"] == str(model_dir) and len(results["costs"]) == 3
    assert all(c["prune_time_s"] >= 0 and c["peak_memory_bytes"] > 0 for c in results["costs"])
    plot = next(out.glob("ppl*.png"))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun finds every pruning run and evaluation in the cache and gives identical numbers.
    again = run_comparison(config, out)
    assert all(cost.cached for cost in again.costs)
    assert [a.metrics[metric] for a in again.rows] == [float(b[metric]) for b in rows]


def test_changed_option_invalidates_only_that_method(setup, tmp_path):
    _, model_dir, text = setup
    out = tmp_path / "results"
    run_comparison(_config(model_dir, text), out)
    changed = _config(model_dir, text, method_options={"gisp": {"steps": "3", "batch_size": "4"}})
    result = run_comparison(changed, out)
    assert {c.method: c.cached for c in result.costs} == {"magnitude": True, "random": True, "gisp": False}
    assert len(list((out / "cache" / "prune").glob("*.json"))) == 4


def test_results_folder_of_another_configuration_is_refused(setup, tmp_path):
    _, model_dir, text = setup
    out = tmp_path / "results"
    run_comparison(_config(model_dir, text, methods=["magnitude"]), out)
    before = sorted(p.name for p in (out / "cache").rglob("*.json"))
    with pytest.raises(ConfigError, match="different configuration.*seed"):
        run_comparison(_config(model_dir, text, methods=["magnitude"], seed=1), out)
    assert sorted(p.name for p in (out / "cache").rglob("*.json")) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"evals": ["nonsense:x=1"]}, "unknown evaluator 'nonsense'"),
        ({"methods": ["gsip"]}, "unknown method 'gsip'"),
        ({"sparsities": [1.5]}, "outside (0, 1)"),
    ],
)
def test_bad_input_fails_before_any_work(setup, tmp_path, override, message):
    _, model_dir, text = setup
    out = tmp_path / "results"
    with pytest.raises((ValueError, LookupError), match=message.replace("(", r"\(").replace(")", r"\)")):
        run_comparison(_config(model_dir, text, **override), out)
    assert not out.exists()


def test_cache_key_mismatch_is_a_miss(tmp_path):
    cache = ResultCache(tmp_path)
    cache.put("eval", {"a": 1}, {"x": 1})
    assert cache.get("eval", {"a": 1}) == {"x": 1}
    assert cache.get("eval", {"a": 2}) is None


def test_compare_runs_shortgpt_and_rebuilds_its_removed_layers_from_the_cache(setup, tmp_path):
    """The default method list holds shortgpt; its cached subnetworks (layer flags) compact again."""
    _, model_dir, text = setup
    assert "shortgpt" in resolve_methods(_config(model_dir, text, methods=[], method_options={}))
    out = tmp_path / "results"
    only = dict(methods=["shortgpt"], method_options={}, sparsities=[0.3])
    first = run_comparison(_config(model_dir, text, **only), out)
    pruned = next(row for row in first.rows if row.method == "shortgpt")
    assert pruned.sparsity == pytest.approx(1 / 3)  # one of the 3 equal layers
    other_eval = [f"perplexity:source=file:{text},seqlen=16,max_windows=4"]  # not cached: the subnetwork is rebuilt
    again = run_comparison(_config(model_dir, text, **only, evals=other_eval), out)
    assert all(cost.cached for cost in again.costs)
    rebuilt = next(row for row in again.rows if row.method == "shortgpt")
    assert rebuilt.sparsity == pruned.sparsity and rebuilt.metrics[f"ppl[file:{text}@16]"] > 1


def test_saved_models_are_exported_and_saved_in_the_form_that_holds_them(setup, tmp_path):
    """ShortGPT's layer removal leaves one shape: the family's own folder; magnitude's ranking does not."""
    _, model_dir, text = setup
    out = tmp_path / "results"
    config = _config(model_dir, text, methods=["shortgpt", "magnitude"], method_options={}, sparsities=[0.3])
    config = ComparisonConfig.from_mapping({**config.to_json(), "save_models": True, "export": ["gguf"]})
    run_comparison(config, out)
    forms = {}
    for method in ("shortgpt", "magnitude"):
        folder = out / "models" / f"{method}-s0.30"
        forms[method] = json.loads((folder / "pruning.json").read_text())["info"]["saved_form"]["form"]
        assert (out / "models" / f"{method}-s0.30-f32.gguf").stat().st_size > 0
    assert forms == {"shortgpt": "native", "magnitude": "gisp-pruned"}


def test_export_without_saved_models_is_refused(setup):
    _, model_dir, text = setup
    with pytest.raises(ConfigError, match="set save_models"):
        _config(model_dir, text, export=["gguf"])
