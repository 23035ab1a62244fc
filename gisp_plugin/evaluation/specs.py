"""Evaluation specs: ``NAME`` or ``NAME:option=value,option=value``, resolved to an evaluator and its options.

Options are separated by commas, so the items of a list option are joined with ``+``:
``perplexity:source=boolq-wiki,seqlen=128`` or ``lm_eval:tasks=boolq+arc_easy,limit=50``. A value may
contain ``:`` and ``=`` (``source=file:/data/text.txt``) but not ``,``.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gisp_plugin.evaluation.api import EvalResult, Evaluator
from gisp_plugin.finite import check_finite_metrics, check_finite_weights
from gisp_plugin.inputs import check_seqlen, context_limit
from gisp_plugin.methods.options import OptionError, parse_assignments, parse_options
from gisp_plugin.plugins.manager import lookup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSpec:
    """One parsed spec: the text the user wrote, the evaluator, and its options."""

    text: str
    evaluator: Evaluator
    options: Any


def _list_fields(options_cls: type) -> set[str]:
    hints = typing.get_type_hints(options_cls)
    return {f.name for f in dataclasses.fields(options_cls) if typing.get_origin(hints[f.name]) in (tuple, list)}


def parse_eval_spec(text: str) -> EvalSpec:
    """``"lm_eval:tasks=boolq+piqa,limit=50"`` -> the ``lm_eval`` evaluator with parsed options."""
    name, _, rest = text.strip().partition(":")
    if not name:
        raise OptionError(f"evaluation spec {text!r} has no evaluator name; expected NAME or NAME:option=value,...")
    evaluator = lookup("evaluator", name)
    values = parse_assignments([part for part in rest.split(",") if part.strip()])
    for key in _list_fields(evaluator.options) & set(values):
        values[key] = values[key].replace("+", ",")
    return EvalSpec(text.strip(), evaluator, parse_options(evaluator.options, values, f"evaluator {name!r}"))


def parse_eval_specs(texts: Iterable[str]) -> list[EvalSpec]:
    """Parse every spec first, so a bad one fails before any model is loaded or measured."""
    specs = [parse_eval_spec(text) for text in texts]
    seen = set()
    for spec in specs:
        if spec.text in seen:
            raise OptionError(f"evaluation spec {spec.text!r} is given twice")
        seen.add(spec.text)
    return specs


def check_spec_inputs(specs: Iterable[EvalSpec], context: int | None, model: str, data: bool = True) -> None:
    """Checks that need no model loaded: each spec's data (with ``data``) and that its seqlen fits.

    Options are duck-typed: an evaluator whose options have ``source`` (a data source name) or
    ``seqlen`` (tokens per window) gets them checked, and its own ``check`` runs (lm-eval task names).
    """
    from gisp_plugin.data.loading import data_source

    for spec in specs:
        source = getattr(spec.options, "source", None)
        if data and isinstance(source, str):
            data_source(source)  # an unknown name or a missing file fails here
        if data and spec.evaluator.check is not None:
            spec.evaluator.check(spec.options)
        seqlen = getattr(spec.options, "seqlen", None)
        if isinstance(seqlen, int):
            check_seqlen(f"evaluation {spec.text!r}", seqlen, context, model)


def run_spec(spec: EvalSpec, model: Any, tokenizer: Any) -> EvalResult:
    """One evaluation; a model with inf/NaN weights, or an inf/NaN metric, stops with ``NonFiniteError``."""
    check_finite_weights(model, f"cannot evaluate {spec.text}")
    result = spec.evaluator.evaluate(model, tokenizer, spec.options)
    check_finite_metrics(result.metrics, f"evaluation {spec.text}")
    return result


def evaluate(model: Any, tokenizer: Any, specs: Iterable[str | EvalSpec]) -> dict[str, EvalResult]:
    """Run every spec on ``model``; results keyed by the spec text as written."""
    parsed = [spec if isinstance(spec, EvalSpec) else parse_eval_spec(spec) for spec in specs]
    name = getattr(model, "name_or_path", "") or "the model"
    check_spec_inputs(parsed, context_limit(getattr(model, "config", None)), name, data=False)  # data: when each runs
    results = {}
    for spec in parsed:
        log.info("evaluating %s", spec.text)
        results[spec.text] = run_spec(spec, model, tokenizer)
    return results
