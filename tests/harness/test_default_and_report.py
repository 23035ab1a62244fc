"""The curated default method list, `all`, the resolution line under each table and the clipped plot."""

import math

import pytest

from gisp_plugin.harness.config import DEFAULT_EVALS, DEFAULT_METHODS, ComparisonConfig, ConfigError
from gisp_plugin.harness.report import _floors, resolution_line
from gisp_plugin.harness.runner import Row, resolve_methods
from gisp_plugin.plugins.manager import registered

PPL = "ppl[text@128]"
SE = "ppl_stderr[text@128]"


def test_default_runs_the_curated_list_and_all_runs_every_registered_method():
    assert list(resolve_methods(ComparisonConfig())) == [m for m in DEFAULT_METHODS if m in registered("method")]
    assert "reap" in registered("method") and "reap" not in resolve_methods(ComparisonConfig())
    assert list(resolve_methods(ComparisonConfig(methods=["all"]))) == list(registered("method"))


def test_all_mixed_with_names_is_refused():
    with pytest.raises(ConfigError, match="either 'all' or method names"):
        ComparisonConfig(methods=["all", "gisp"])


def test_default_evaluations_hold_no_task_too_small_to_resolve():
    """PIQA at limit 50 (stderr 0.07) was noise; the default measures perplexity only."""
    assert all(spec.startswith("perplexity:") for spec in DEFAULT_EVALS)


def _rows(values: dict[str, tuple[float, float]]) -> list[Row]:
    return [Row(m, 0.2, 0.2, {PPL: v, SE: e}) for m, (v, e) in values.items()]


def test_resolution_line_names_exactly_the_pairs_within_two_standard_errors():
    # log-scale test: |ln a - ln b| <= 2 * hypot(se_a/a, se_b/b)
    # a~b: |ln(56/53)| = 0.055 <= 2*hypot(6/56, 6/53) = 0.31; a vs c: ln(150/53) = 1.04 > 2*hypot(0.113, 0.2) = 0.46
    rows = _rows({"a": (53, 6), "b": (56, 6), "c": (150, 30)})
    line = resolution_line(rows, PPL)
    assert "at 20%: a~b." in line
    assert "a~c" not in line and "b~c" not in line
    # just beyond two standard errors on each side of the boundary
    bound = 2 * math.hypot(0.05, 0.05)
    near = _rows({"a": (100, 5), "b": (100 * math.exp(bound * 0.99), 5 * math.exp(bound * 0.99))})
    far = _rows({"a": (100, 5), "b": (100 * math.exp(bound * 1.01), 5 * math.exp(bound * 1.01))})
    assert "a~b" in resolution_line(near, PPL)
    assert resolution_line(far, PPL).startswith("Every pair")


def test_floors_are_the_methods_far_above_the_median():
    worst = {"gisp": 149, "shortgpt": 138, "flap": 480, "wanda_sp": 590, "magnitude": 3.5e6, "random": 6e5}
    assert _floors(worst) == {"magnitude", "random"}
    assert _floors({"gisp": 149, "flap": 480, "wanda_sp": 590}) == set()
