"""The real SmolLM2-135M: every baseline prunes to 20% and 50%, compacts, saves, reloads, and stays sensible.

Calibration: 16 x 64 tokens of LAMBADA novels; perplexity: 8 windows of 128 tokens of the held-apart
BoolQ Wikipedia passages (different sources, no overlap). Small on purpose: a few minutes on 2 cores.
"""

import math

import pytest

from gisp_plugin.checkpoint.saving import load_pruned, save_pruned
from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.evaluation.perplexity import evaluation_text, perplexity_of_text
from gisp_plugin.pruning import compact_subnetwork, pruning_record, resolve_method, run_method

TARGETS = (0.2, 0.5)
REQUEST = CalibrationRequest("lambada-novels", n_samples=16, seqlen=64, seed=0)


@pytest.fixture(scope="module")
def setting(smollm2):
    model, tokenizer = smollm2
    text = evaluation_text("boolq-wiki")
    dense = perplexity_of_text(model, tokenizer, text, seqlen=128, max_windows=8).ppl
    return model, tokenizer, text, load_calibration(REQUEST, tokenizer), dense


@pytest.mark.parametrize("method", ["wanda_sp", "flap", "llm_pruner"])
def test_prune_compact_reload_and_perplexity(method, setting, tmp_path):
    model, tokenizer, text, calibration, dense = setting
    _, options = resolve_method(method)
    ppl = {}
    for sub in run_method(model, tokenizer, method, TARGETS, calibration=calibration):
        assert abs(sub.sparsity - sub.target) < 0.01, (method, sub.target, sub.sparsity)
        compact, params = compact_subnetwork(model, sub)
        record = pruning_record("smollm2-135m", method, options, sub, compact, params, REQUEST.label, 0)
        assert abs(record.sparsity - sub.target) < 0.01  # counted on the real tensors of the compacted model
        folder = save_pruned(compact, tokenizer, tmp_path / f"{method}-{sub.target}", record)
        del compact
        reloaded = load_pruned(folder)
        ppl[sub.target] = perplexity_of_text(reloaded, tokenizer, text, seqlen=128, max_windows=8).ppl
    assert all(math.isfinite(value) for value in ppl.values()), ppl
    assert dense < ppl[0.2] < ppl[0.5], (dense, ppl)
