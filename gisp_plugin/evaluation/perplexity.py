"""Perplexity on a text corpus, the way the pruning papers measure it.

The evaluation text is tokenised once, cut into non-overlapping windows of ``seqlen`` tokens (the
ragged tail is dropped), and perplexity is the exponential of the mean next-token negative
log-likelihood over every predicted token of every window (``seqlen - 1`` per window). This equals
the ``eval_ppl`` of SparseGPT, Wanda and FLAP, whose per-window mean loss times ``seqlen`` averages to
the same number because every window has the same length. The context length changes the number a
lot (128 tokens is the pruning papers' setting for structured pruning, 2048 for unstructured), so it
is part of every metric name: ``ppl[boolq-wiki@128]``.

Its standard error, ``ppl_stderr[...]``, treats the windows as a sample: the standard error of the
mean per-window NLL (sample standard deviation over the windows / sqrt(windows)), carried to perplexity
by the delta method (``ppl * se(mean NLL)``). Neighbouring windows come from running text and are not
fully independent, so read it as the noise of the number, not as a strict confidence bound.

Each text is tokenised once per process and tokenizer (``data.windows.token_stream``), not once per
model measured: a comparison measures a dozen models on the same text.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gisp_plugin.data.windows import token_stream
from gisp_plugin.evaluation.api import EvalResult

log = logging.getLogger(__name__)


@dataclass
class PerplexityOptions:
    """Options of the ``perplexity`` evaluator.

    ``source``: a text data source by name (``boolq-wiki``, ``lambada-novels``, ``wikitext2``, ``c4``,
    ``ptb`` or ``file:PATH``); its evaluation part is measured. ``seqlen``: tokens per window (the
    context length). ``max_windows`` / ``max_tokens``: stop after this many windows / tokens (the
    first windows of the text; ``None`` measures all of it). ``batch_size``: windows per forward pass.
    """

    source: str = "boolq-wiki"
    seqlen: int = 128
    max_windows: int | None = None
    max_tokens: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be >= 2, got {self.seqlen}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("max_windows", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {value}")


@dataclass
class PerplexityResult:
    """Perplexity plus what it was measured on."""

    ppl: float
    mean_nll: float
    seqlen: int
    windows: int
    predicted_tokens: int
    text_tokens: int
    ppl_stderr: float | None = None  # None with one window


def text_windows(
    tokenizer: Any, text: str, seqlen: int, max_windows: int | None = None, max_tokens: int | None = None
) -> tuple[torch.Tensor, int]:
    """Non-overlapping ``[windows, seqlen]`` token windows from the start of ``text``, and its token count.

    The tokens of ``text`` are cached per tokenizer under the text's hash: measuring many models on one
    text tokenises it once.
    """
    key = "text/" + hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()
    ids = token_stream(tokenizer, key, lambda: text)
    limit = len(ids) // seqlen
    if max_windows is not None:
        limit = min(limit, max_windows)
    if max_tokens is not None:
        limit = min(limit, max_tokens // seqlen)
    if limit < 1:
        raise ValueError(
            f"the evaluation text has {len(ids)} tokens, too few for one window of seqlen={seqlen}"
            + (f" within max_tokens={max_tokens}" if max_tokens is not None else "")
        )
    windows = ids[: limit * seqlen].view(limit, seqlen).clone()
    return windows, len(ids)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def window_nlls(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, desc: str = "perplexity") -> torch.Tensor:
    """Next-token negative log-likelihood (nats, float64) summed within each window: ``[windows]``."""
    device = _device_of(model)
    per_window = []
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # [batch, seqlen, vocab]
        predicted = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [batch * (seqlen-1), vocab], contiguous rows
        nll = F.cross_entropy(predicted, batch[:, 1:].reshape(-1), reduction="none").view(len(batch), -1)  # [batch, seqlen-1]
        per_window.append(nll.double().sum(dim=1).cpu())
    return torch.cat(per_window)


def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, desc: str = "perplexity") -> float:
    """Summed next-token negative log-likelihood (nats, float64) over all windows ``[windows, seqlen]``."""
    return float(window_nlls(model, windows, batch_size, desc).sum())


def ppl_with_stderr(nll_per_window: torch.Tensor, predicted_per_window: int) -> tuple[float, float, float | None]:
    """Perplexity, mean NLL per token and the perplexity's standard error from per-window NLL sums.

    The error: sample standard deviation of the per-window mean NLL / sqrt(windows), times the
    perplexity (delta method for exp); ``None`` for a single window.
    """
    per_token = nll_per_window.double() / predicted_per_window  # [windows]
    mean_nll = float(per_token.mean())
    ppl = math.exp(mean_nll)
    if len(per_token) < 2:
        return ppl, mean_nll, None
    se_nll = float(per_token.std(unbiased=True)) / math.sqrt(len(per_token))
    return ppl, mean_nll, ppl * se_nll


def perplexity_of_text(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    seqlen: int = 128,
    max_windows: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Perplexity of ``model`` on raw ``text``: exp(mean next-token NLL) over non-overlapping windows.

    Works for dense, masked (parametrised) and compacted models in any dtype on any device; logits are
    upcast to float32 before the softmax.
    """
    windows, text_tokens = text_windows(tokenizer, text, seqlen, max_windows, max_tokens)
    was_training = model.training
    model.eval()
    try:
        nlls = window_nlls(model, windows, batch_size, desc=f"perplexity@{seqlen}")
    finally:
        model.train(was_training)
    ppl, mean_nll, ppl_stderr = ppl_with_stderr(nlls, seqlen - 1)
    return PerplexityResult(
        ppl=ppl,
        mean_nll=mean_nll,
        seqlen=seqlen,
        windows=windows.shape[0],
        predicted_tokens=windows.shape[0] * (seqlen - 1),
        text_tokens=text_tokens,
        ppl_stderr=ppl_stderr,
    )


def evaluation_text(source: str) -> str:
    """The evaluation part of a text data source (never the part calibration draws from)."""
    from gisp_plugin.data.loading import data_source

    data = data_source(source)
    if data.text is None:
        raise ValueError(f"data source {source!r} is {data.kind} data, not text; perplexity needs a text source")
    return data.text("evaluation")


def evaluate_perplexity(model: torch.nn.Module, tokenizer: Any, options: PerplexityOptions) -> EvalResult:
    """The ``perplexity`` evaluator: perplexity on the evaluation part of ``options.source``."""
    text = evaluation_text(options.source)
    started = time.perf_counter()
    result = perplexity_of_text(
        model, tokenizer, text, options.seqlen, options.max_windows, options.max_tokens, options.batch_size
    )
    elapsed = time.perf_counter() - started
    name = f"ppl[{options.source}@{options.seqlen}]"
    log.info("%s = %.3f (%d windows of %d tokens, %.1f s)", name, result.ppl, result.windows, options.seqlen, elapsed)
    metrics = {name: result.ppl}
    if result.ppl_stderr is not None:
        metrics[f"ppl_stderr[{options.source}@{options.seqlen}]"] = result.ppl_stderr
    return EvalResult(
        metrics=metrics,
        details={
            "evaluator": "perplexity",
            "source": options.source,
            "split": "evaluation",
            "seqlen": options.seqlen,
            "context_length": f"{options.seqlen} tokens per window (non-overlapping)",
            "windows": result.windows,
            "predicted_tokens": result.predicted_tokens,
            "text_tokens": result.text_tokens,
            "complete": result.windows == result.text_tokens // options.seqlen,
            "mean_nll": result.mean_nll,
            "ppl_stderr_rule": "se of the mean per-window NLL over windows, times ppl (delta method)",
            "elapsed_s": round(elapsed, 2),
        },
    )
