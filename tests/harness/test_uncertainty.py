"""A number with its standard error shows no more digits than the error supports."""

import math

import pytest

from gisp_plugin.harness.uncertainty import error_decimals, is_stderr, metric_text, stderr_name, with_error


@pytest.mark.parametrize(
    ("value", "stderr", "shown"),
    [
        (0.54, 0.0712, "0.54 ± 0.07"),  # accuracy at limit 50: not 0.5400
        (0.54, 0.0504, "0.54 ± 0.05"),
        (0.5, 0.0141, "0.500 ± 0.014"),  # an error starting with 1 keeps two digits
        (0.43, 0.096, "0.43 ± 0.10"),  # 0.096 rounds up to 0.10, which starts with 1
        (28.604, 1.34, "28.6 ± 1.3"),
        (156.02, 9.6, "156 ± 10"),
        (719.19, 48.3, "720 ± 50"),
        (908954.36, 84000.0, "910000 ± 80000"),
        (-0.1234, 0.03, "-0.12 ± 0.03"),
    ],
)
def test_digits_follow_the_error(value, stderr, shown):
    assert with_error(value, stderr) == shown


@pytest.mark.parametrize(("stderr", "decimals"), [(0.07, 2), (0.014, 3), (0.1, 2), (0.3, 1), (3.0, 0), (30.0, -1), (0.96, 1)])
def test_error_decimals(stderr, decimals):
    assert error_decimals(stderr) == decimals


@pytest.mark.parametrize("stderr", [None, 0.0, math.nan, math.inf])
def test_without_a_usable_error_the_plain_number_is_shown(stderr):
    assert with_error(0.54, stderr) == "0.5400"
    assert with_error(28.604, stderr) == "28.60"


def test_missing_and_non_finite_values():
    assert with_error(None, 0.1) == "-"
    assert with_error(math.inf, 0.1) == "inf"


def test_stderr_names_follow_lm_eval():
    assert stderr_name("acc_norm[piqa]") == "acc_norm_stderr[piqa]"
    assert stderr_name("mean_acc") == "mean_acc_stderr"
    assert stderr_name("ppl[boolq-wiki@128]") == "ppl_stderr[boolq-wiki@128]"
    assert is_stderr("acc_stderr[piqa]") and is_stderr("mean_acc_stderr") and not is_stderr("acc[piqa]")
    metrics = {"mean_acc": 0.54, "mean_acc_stderr": 0.0495, "ppl[x@128]": 28.6}
    assert metric_text(metrics, "mean_acc") == "0.54 ± 0.05"
    assert metric_text(metrics, "ppl[x@128]") == "28.60"
