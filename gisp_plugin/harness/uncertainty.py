"""Measured numbers for people: a value with its standard error, and no more digits than the error supports.

The rule: the standard error keeps one significant digit, two when that digit is a 1 (0.07, 0.014,
1.3, 80000), and the value is rounded to the same decimal place: ``0.54 ± 0.07``, ``28.6 ± 1.3``.
A metric's standard error is the metric of the same name with ``_stderr`` added to its base name, the
way lm-eval names them: ``acc_norm[piqa]`` -> ``acc_norm_stderr[piqa]``, ``mean_acc`` ->
``mean_acc_stderr``, ``ppl[boolq-wiki@128]`` -> ``ppl_stderr[boolq-wiki@128]``.

Only the human tables round; JSON and CSV keep every digit.
"""

from __future__ import annotations

import math

STDERR_SUFFIX = "_stderr"


def stderr_name(metric: str) -> str:
    """The name of ``metric``'s standard error: ``acc[piqa]`` -> ``acc_stderr[piqa]``."""
    base, bracket, rest = metric.partition("[")
    return f"{base}{STDERR_SUFFIX}{bracket}{rest}"


def is_stderr(metric: str) -> bool:
    return metric.partition("[")[0].endswith(STDERR_SUFFIX)


def _usable(number: float | None) -> bool:
    return number is not None and math.isfinite(number)


def error_decimals(stderr: float) -> int:
    """Decimal places that keep the error's first significant digit (two digits when it starts with 1).

    Negative for errors of 10 and more: -4 rounds to tens of thousands.
    """
    if not stderr > 0 or not math.isfinite(stderr):
        raise ValueError(f"a standard error must be positive and finite, got {stderr}")
    exponent = math.floor(math.log10(stderr))
    digits = 2 if stderr / 10**exponent < 2 else 1
    rounded = round(stderr, digits - 1 - exponent)  # 0.096 -> 0.1: the leading digit may change
    exponent = math.floor(math.log10(rounded))
    digits = 2 if rounded / 10**exponent < 2 else 1
    return digits - 1 - exponent


def _fixed(number: float, decimals: int) -> str:
    return f"{number:.{decimals}f}" if decimals >= 0 else f"{round(number, decimals):.0f}"


def plain(value: float | None) -> str:
    """A number without a known error: two decimals, four below 1 (``-`` when missing)."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def with_error(value: float | None, stderr: float | None) -> str:
    """``value ± stderr`` rounded to the error's digits; the plain number when the error is unknown or zero."""
    if not _usable(value) or not _usable(stderr) or stderr <= 0:
        return plain(value)
    decimals = error_decimals(stderr)
    return f"{_fixed(value, decimals)} ± {_fixed(stderr, decimals)}"


def metric_text(metrics: dict[str, float], name: str) -> str:
    """``metrics[name]`` with its standard error from the same dict, for a table cell."""
    return with_error(metrics.get(name), metrics.get(stderr_name(name)))
