"""The perplexity evaluator against an independent plain-torch computation."""

from __future__ import annotations

import math

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.evaluation.perplexity import PerplexityOptions, evaluate_perplexity, perplexity_of_text
from gisp_plugin.masking.masked_model import MaskedModel
from tests.evaluation.conftest import EVAL_TEXT
from tests.tiny import random_keep, tiny_model


def reference_ppl(model, tokenizer, text: str, seqlen: int, windows: int | None = None) -> float:
    """Window by window in float64: exp of the mean of -log p(next token) over every predicted token."""
    ids = tokenizer(text)["input_ids"]
    count = len(ids) // seqlen if windows is None else windows
    total, n = 0.0, 0
    with torch.no_grad():
        for w in range(count):
            window = torch.tensor(ids[w * seqlen : (w + 1) * seqlen]).unsqueeze(0)
            logprobs = torch.log_softmax(model(window).logits[0].double(), dim=-1)  # [seqlen, vocab]
            targets = window[0, 1:]
            total -= logprobs[torch.arange(seqlen - 1), targets].sum().item()
            n += seqlen - 1
    return math.exp(total / n)


@pytest.mark.parametrize("seqlen", [16, 37])
def test_matches_independent_computation(tokenizer, seqlen):
    model = tiny_model("llama")
    result = perplexity_of_text(model, tokenizer, EVAL_TEXT, seqlen=seqlen, batch_size=3)
    assert result.windows == len(tokenizer(EVAL_TEXT)["input_ids"]) // seqlen
    assert result.predicted_tokens == result.windows * (seqlen - 1)
    assert result.ppl == pytest.approx(reference_ppl(model, tokenizer, EVAL_TEXT, seqlen), rel=1e-6)


def test_window_and_token_limits(tokenizer):
    model = tiny_model("qwen2")
    expected = reference_ppl(model, tokenizer, EVAL_TEXT, 16, windows=3)
    by_windows = perplexity_of_text(model, tokenizer, EVAL_TEXT, seqlen=16, max_windows=3)
    by_tokens = perplexity_of_text(model, tokenizer, EVAL_TEXT, seqlen=16, max_tokens=63, max_windows=10)
    assert by_windows.windows == by_tokens.windows == 3
    assert by_windows.ppl == pytest.approx(expected, rel=1e-6)
    assert by_tokens.ppl == pytest.approx(expected, rel=1e-6)


def test_masked_model_equals_its_compacted_model(tokenizer):
    """Perplexity sees the subnetwork whether it is masked on the dense model or compacted."""
    model = tiny_model("mistral")
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, 0, 0.6)
    dense = perplexity_of_text(model, tokenizer, EVAL_TEXT, seqlen=32).ppl
    compact = perplexity_of_text(adapter.compact(model, keep, {}), tokenizer, EVAL_TEXT, seqlen=32).ppl
    with MaskedModel(model, anatomy) as masked:
        masked.apply(keep)
        masked_ppl = perplexity_of_text(model, tokenizer, EVAL_TEXT, seqlen=32).ppl
    assert masked_ppl == pytest.approx(compact, rel=1e-4)
    assert abs(masked_ppl - dense) > 1e-3 * dense  # the masks did change the model
    assert perplexity_of_text(model, tokenizer, EVAL_TEXT, seqlen=32).ppl == pytest.approx(dense, rel=1e-6)


def test_bfloat16_is_close_to_float32(tokenizer):
    model = tiny_model("llama")
    fp32 = perplexity_of_text(model, tokenizer, EVAL_TEXT, seqlen=32, max_windows=4).ppl
    bf16 = perplexity_of_text(model.to(torch.bfloat16), tokenizer, EVAL_TEXT, seqlen=32, max_windows=4).ppl
    assert bf16 == pytest.approx(fp32, rel=0.02)


def test_evaluator_reads_the_sources_evaluation_part(tokenizer, test_source):
    model = tiny_model("llama")
    result = evaluate_perplexity(model, tokenizer, PerplexityOptions(source=test_source, seqlen=16, max_windows=4))
    assert list(result.metrics) == [f"ppl[{test_source}@16]", f"ppl_stderr[{test_source}@16]"]
    assert result.details["seqlen"] == 16 and result.details["windows"] == 4 and not result.details["complete"]
    assert result.metrics[f"ppl[{test_source}@16]"] == pytest.approx(
        reference_ppl(model, tokenizer, EVAL_TEXT, 16, windows=4), rel=1e-6
    )


def test_standard_error_over_windows(tokenizer):
    """se(ppl) = ppl * sample std of the per-window mean NLL / sqrt(windows); none for one window."""
    model = tiny_model("llama")
    result = perplexity_of_text(model, tokenizer, EVAL_TEXT, seqlen=16, max_windows=6, batch_size=4)
    ids = tokenizer(EVAL_TEXT)["input_ids"]
    per_window = []
    with torch.no_grad():
        for w in range(6):
            window = torch.tensor(ids[w * 16 : (w + 1) * 16]).unsqueeze(0)
            logprobs = torch.log_softmax(model(window).logits[0].double(), dim=-1)
            per_window.append(-logprobs[torch.arange(15), window[0, 1:]].mean().item())
    mean = sum(per_window) / 6
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_window) / 5)
    assert result.ppl == pytest.approx(math.exp(mean), rel=1e-6)
    assert result.ppl_stderr == pytest.approx(math.exp(mean) * sd / math.sqrt(6), rel=1e-5)
    assert perplexity_of_text(model, tokenizer, EVAL_TEXT, seqlen=16, max_windows=1).ppl_stderr is None


def test_text_is_tokenised_once_per_tokenizer(tokenizer):
    """Measuring many models on one text tokenises it once (the comparison measures a dozen)."""
    text = EVAL_TEXT + " once"
    calls = []

    class Counting:
        def __call__(self, *args, **kwargs):
            calls.append(args[0])
            return tokenizer(*args, **kwargs)

    counting = Counting()
    first = perplexity_of_text(tiny_model("llama"), counting, text, seqlen=16, max_windows=2)
    second = perplexity_of_text(tiny_model("qwen2"), counting, text, seqlen=16, max_windows=2)
    assert len(calls) == 1 and first.text_tokens == second.text_tokens
    perplexity_of_text(tiny_model("llama"), counting, text + " changed", seqlen=16, max_windows=2)
    assert len(calls) == 2  # another text is tokenised anew


def test_text_too_short_for_one_window(tokenizer):
    with pytest.raises(ValueError, match="too few for one window of seqlen=512"):
        perplexity_of_text(tiny_model("llama"), tokenizer, "short text", seqlen=512)


def test_bad_options():
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        PerplexityOptions(seqlen=1)
    with pytest.raises(ValueError, match="max_windows must be >= 1"):
        PerplexityOptions(max_windows=0)
