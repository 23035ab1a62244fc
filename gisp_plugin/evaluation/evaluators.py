"""Built-in evaluator plugin: ``perplexity`` and ``lm_eval``, registered like any third-party evaluator."""

from __future__ import annotations

from gisp_plugin.evaluation.api import Evaluator
from gisp_plugin.evaluation.lm_eval_bridge import LmEvalOptions, check_lm_eval, evaluate_lm_eval
from gisp_plugin.evaluation.perplexity import PerplexityOptions, evaluate_perplexity
from gisp_plugin.plugins import hookimpl

PERPLEXITY = Evaluator(
    name="perplexity",
    description="Perplexity on non-overlapping windows of a text source's evaluation part (seqlen default 128)",
    evaluate=evaluate_perplexity,
    options=PerplexityOptions,
)

LM_EVAL = Evaluator(
    name="lm_eval",
    description="Zero-shot accuracy (acc, acc_norm) and GSM8K exact match through lm-eval's simple_evaluate",
    evaluate=evaluate_lm_eval,
    options=LmEvalOptions,
    check=check_lm_eval,
)


@hookimpl
def gisp_evaluators() -> list[Evaluator]:
    return [PERPLEXITY, LM_EVAL]
