"""A context followed by a scored continuation, tokenised exactly as lm-eval scores it.

Task calibration data (multiple-choice options, GSM8K answers) must see the same tokens the
evaluation scores, so the pair is encoded the lm-eval way (``lm_eval.api.model._encode_pair`` for
causal models): trailing spaces of the context move to the continuation, ``context + continuation``
is tokenised as a whole, and the continuation is what follows the context's own tokens. The loss
mask flags the continuation tokens only.

A pair longer than ``seqlen`` tokens loses context tokens from the left first (as lm-eval truncates);
a continuation so long that it would crowd out the context (a GSM8K answer at ``seqlen`` 128) keeps
its first tokens after the last ``seqlen // 2`` context tokens, so every scored token still sees the
question it answers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from gisp_plugin.data.windows import encode


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` of a non-empty context and its continuation, as lm-eval splits them."""
    if not context:
        raise ValueError("a scored continuation needs a non-empty context")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    n_context = len(encode(tokenizer, context))
    return whole[:n_context], whole[n_context:]


class ScoredSequence(NamedTuple):
    """Token ids, a mask that is True on the continuation tokens, and how many leading tokens were cut."""

    ids: torch.Tensor  # [tokens], tokens <= seqlen
    mask: torch.Tensor  # [tokens], bool
    dropped: int


def scored_sequence(tokenizer: Any, context: str, continuation: str, seqlen: int) -> ScoredSequence:
    """``context + continuation`` as at most ``seqlen`` tokens (see the module docstring), the loss on the continuation."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} has no tokens of its own after context ...{context[-40:]!r}")
    total = len(context_ids) + len(continuation_ids)
    keep_context = len(context_ids)
    if total > seqlen:
        keep_context = max(seqlen - len(continuation_ids), min(len(context_ids), seqlen // 2))
    kept = context_ids[len(context_ids) - keep_context :] + continuation_ids[: seqlen - keep_context]
    mask = torch.zeros(len(kept), dtype=torch.bool)
    mask[keep_context:] = True
    return ScoredSequence(torch.tensor(kept, dtype=torch.long), mask, total - len(kept))
