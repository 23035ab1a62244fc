"""Random windows of exactly ``seqlen`` tokens, drawn the way the pruning reference loaders draw them.

Two ways, both deterministic per seed through a private ``random.Random(seed)`` (the global random
state is never touched):

- ``stream_windows``: the corpus is tokenised as one stream and each window starts at
  ``randint(0, len - seqlen - 1)`` (SparseGPT / Wanda / FLAP / GISP ``get_wikitext2`` and ``get_ptb``);
  with the same tokenisation the windows are exactly the reference's.
- ``document_windows``: pick a random document, keep it if it has more than ``seqlen`` tokens, then a
  random window inside it (the reference ``get_c4``). Only the drawn documents are tokenised, so a
  356k-document C4 shard costs a few hundred tokenizer calls instead of hours.

Tokenising a whole corpus takes seconds, so streams are cached per process and tokenizer.
"""

from __future__ import annotations

import logging
import random
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

_STREAMS: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


class CorpusTooShortError(ValueError):
    """A corpus with too few tokens for one window of the requested length."""


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's own defaults (a BOS where the tokenizer adds one)."""
    return tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]


def token_stream(tokenizer: Any, key: str, text: Callable[[], str]) -> torch.Tensor:
    """The token ids of a corpus as one 1-D stream, cached per tokenizer under ``key``."""
    cache = _STREAMS.setdefault(tokenizer, {})
    if key not in cache:
        start = time.perf_counter()
        raw = text()
        cache[key] = torch.tensor(encode(tokenizer, raw), dtype=torch.long)
        seconds = time.perf_counter() - start
        log.info("tokenised %s: %d characters -> %d tokens in %.1f s", key, len(raw), len(cache[key]), seconds)
    return cache[key]


def stream_windows(stream: torch.Tensor, n_samples: int, seqlen: int, seed: int, corpus: str = "corpus") -> list[torch.Tensor]:
    """``n_samples`` windows of exactly ``seqlen`` tokens at seeded random offsets of ``stream``."""
    if len(stream) <= seqlen:
        raise CorpusTooShortError(
            f"{corpus} has {len(stream)} tokens; a window of seqlen={seqlen} needs at least {seqlen + 1} (use a smaller seqlen)"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(n_samples)]
    return [stream[start : start + seqlen].clone() for start in starts]


def document_windows(
    documents: Sequence[str],
    tokenizer: Any,
    n_samples: int,
    seqlen: int,
    seed: int,
    corpus: str = "corpus",
    max_draws: int | None = None,
) -> list[torch.Tensor]:
    """``n_samples`` windows of ``seqlen`` tokens, each from a random document longer than ``seqlen`` tokens."""
    if not documents:
        raise CorpusTooShortError(f"{corpus} has no documents")
    rng = random.Random(seed)
    budget = max_draws if max_draws is not None else 100 * n_samples + 1000
    windows: list[torch.Tensor] = []
    draws = 0
    while len(windows) < n_samples:
        if draws >= budget:
            raise CorpusTooShortError(
                f"{corpus}: only {len(windows)} of {n_samples} windows after {draws} random documents; "
                f"too few documents have more than seqlen={seqlen} tokens (use a smaller seqlen)"
            )
        draws += 1
        ids = encode(tokenizer, documents[rng.randint(0, len(documents) - 1)])
        if len(ids) > seqlen:
            start = rng.randint(0, len(ids) - seqlen - 1)
            windows.append(torch.tensor(ids[start : start + seqlen], dtype=torch.long))
    return windows
