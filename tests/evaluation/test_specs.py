"""Evaluation specs: parsing into options dataclasses, errors that list the choices, running by name."""

from __future__ import annotations

import pytest

from gisp_plugin.evaluation.lm_eval_bridge import LmEvalOptions
from gisp_plugin.evaluation.perplexity import PerplexityOptions
from gisp_plugin.evaluation.specs import evaluate, parse_eval_spec, parse_eval_specs
from gisp_plugin.methods.options import OptionError
from gisp_plugin.plugins.manager import UnknownNameError, registered
from tests.tiny import tiny_model


def test_builtin_evaluators_are_plugins():
    evaluators = registered("evaluator")
    assert {"perplexity", "lm_eval"} <= set(evaluators)
    assert evaluators["perplexity"].plugin == "gisp_plugin.evaluation.evaluators"


def test_perplexity_spec():
    spec = parse_eval_spec("perplexity:source=boolq-wiki,seqlen=512,max_windows=20")
    assert spec.evaluator.name == "perplexity"
    assert spec.options == PerplexityOptions(source="boolq-wiki", seqlen=512, max_windows=20)
    assert parse_eval_spec("perplexity").options == PerplexityOptions()  # defaults: boolq-wiki at 128


def test_list_items_are_joined_with_plus():
    spec = parse_eval_spec("lm_eval:tasks=boolq+arc_easy,limit=50,offline=true")
    assert spec.options == LmEvalOptions(tasks=("boolq", "arc_easy"), limit=50, offline="true")


def test_values_may_hold_colons_and_equals():
    spec = parse_eval_spec("perplexity:source=file:/data/a=b.txt,seqlen=64")
    assert spec.options.source == "file:/data/a=b.txt" and spec.options.seqlen == 64


def test_unknown_evaluator_lists_the_available_ones():
    with pytest.raises(UnknownNameError, match=r"unknown evaluator 'perplexty'; available: .*lm_eval.*perplexity"):
        parse_eval_spec("perplexty:seqlen=128")


def test_bad_options_name_the_valid_ones():
    with pytest.raises(OptionError, match=r"unknown option 'context' for evaluator 'perplexity'; valid options: source, seqlen"):
        parse_eval_spec("perplexity:context=128")
    with pytest.raises(OptionError, match=r"offline='maybe' is not one of auto, true, false"):
        parse_eval_spec("lm_eval:offline=maybe")
    with pytest.raises(OptionError, match="seqlen must be >= 2"):
        parse_eval_spec("perplexity:seqlen=1")
    with pytest.raises(OptionError, match="given twice"):
        parse_eval_specs(["perplexity", " perplexity"])


def test_evaluate_runs_each_spec(tokenizer, test_source):
    specs = [f"perplexity:source={test_source},seqlen=16,max_windows=2", f"perplexity:source={test_source},seqlen=32"]
    results = evaluate(tiny_model("llama"), tokenizer, specs)
    assert list(results) == specs
    assert set(results[specs[0]].metrics) == {f"ppl[{test_source}@16]", f"ppl_stderr[{test_source}@16]"}
    assert results[specs[1]].details["seqlen"] == 32
