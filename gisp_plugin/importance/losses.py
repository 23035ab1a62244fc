"""Calibration objectives whose gradients score structures: ``ntp``, ``margin``, ``answer_ntp`` (plugins).

A loss is two small functions. ``per_sample(logits, batch)`` gives each sequence's loss: the mean
next-token cross-entropy over the tokens that sequence is scored on. ``sample_weights(calibration)``
gives each sequence's weight over the *whole* set, so that the objective ``sum_i w_i * loss_i`` is a
plain sum over samples: summing it batch by batch and back-propagating gives the full-set gradient
(see ``gisp_plugin.importance.gradients``).

- ``ntp``: every token of every sequence (padding aside), ``w_i = 1 / N``. This is the GISP reference's
  ``loss = mean token CE * batch_size`` accumulated and divided by ``n_samples``; we average per sequence
  first, so padded batches give the same gradient as one sequence at a time.
- ``margin``: multiple-choice data, every option its own sequence scored on its option tokens only;
  ``w_i = +1 / n_pos`` for correct options and ``-1 / n_neg`` for wrong ones (counts over the whole set),
  so the gradient is ``g_pos / n_pos - g_neg / n_neg`` in one backward.
- ``answer_ntp``: question/answer data, scored on the answer tokens only (the data's loss mask),
  ``w_i = 1 / N``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gisp_plugin.data.api import CalibrationBatch, CalibrationSet
from gisp_plugin.plugins import hookimpl

log = logging.getLogger(__name__)

IGNORE = -100


class CalibrationDataError(ValueError):
    """Calibration data that does not fit the chosen loss (no scored tokens, no correct/wrong options)."""


@dataclass(frozen=True)
class Loss:
    """A named calibration objective: per-sequence losses and their set-wide weights."""

    name: str
    description: str
    per_sample: Callable[[torch.Tensor, CalibrationBatch], torch.Tensor]
    sample_weights: Callable[[CalibrationSet], torch.Tensor]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sequence ``[batch]`` (float32); ``labels`` -100 where not scored.

    Position ``t`` predicts label ``t + 1``; a sequence without a scored token gets loss 0.
    """
    shifted = labels[:, 1:]
    flat = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(shifted.shape)
    counts = (shifted != IGNORE).sum(1)
    return flat.sum(1) / counts.clamp(min=1)


def all_tokens(batch: CalibrationBatch) -> torch.Tensor:
    """Labels that score every real token (padding excluded), whatever the data's loss mask says."""
    return batch.input_ids.masked_fill(batch.attention_mask == 0, IGNORE)


def scored(calibration: CalibrationSet, use_loss_mask: bool) -> torch.Tensor:
    """Which sequences have at least one scored prediction target (bool ``[n]``)."""
    flags = []
    for sequence, mask in zip(calibration.sequences, calibration.loss_masks, strict=True):
        targets = mask[1:] if use_loss_mask else torch.ones(max(len(sequence) - 1, 0), dtype=torch.bool)
        flags.append(bool(targets.any()))
    return torch.tensor(flags, dtype=torch.bool)


def _mean_weights(calibration: CalibrationSet, use_loss_mask: bool, loss: str) -> torch.Tensor:
    ok = scored(calibration, use_loss_mask)
    if not bool(ok.any()):
        raise CalibrationDataError(f"loss {loss!r}: no sequence of {calibration.name!r} has a token to predict")
    if int((~ok).sum()):
        log.warning("loss %s: %d of %d sequences have no scored token and are skipped", loss, int((~ok).sum()), len(ok))
    return ok.double() / ok.sum()


# --- ntp -------------------------------------------------------------------------------------------------


def ntp_per_sample(logits: torch.Tensor, batch: CalibrationBatch) -> torch.Tensor:
    return token_cross_entropy(logits, all_tokens(batch))


def ntp_weights(calibration: CalibrationSet) -> torch.Tensor:
    if any(p != 0 for p in calibration.polarity):
        log.warning("loss ntp on multiple-choice data %r scores wrong options too; loss=margin fits it", calibration.name)
    return _mean_weights(calibration, use_loss_mask=False, loss="ntp")


# --- answer_ntp ------------------------------------------------------------------------------------------


def masked_per_sample(logits: torch.Tensor, batch: CalibrationBatch) -> torch.Tensor:
    return token_cross_entropy(logits, batch.labels)


def answer_ntp_weights(calibration: CalibrationSet) -> torch.Tensor:
    if all(bool(mask.all()) for mask in calibration.loss_masks):
        log.warning("loss answer_ntp on %r: every token is scored (plain text?), so it equals ntp", calibration.name)
    return _mean_weights(calibration, use_loss_mask=True, loss="answer_ntp")


# --- margin ----------------------------------------------------------------------------------------------


def margin_weights(calibration: CalibrationSet) -> torch.Tensor:
    ok = scored(calibration, use_loss_mask=True)
    polarity = torch.tensor(calibration.polarity, dtype=torch.long)
    positive, negative = ok & (polarity > 0), ok & (polarity < 0)
    n_pos, n_neg = int(positive.sum()), int(negative.sum())
    if n_pos == 0 or n_neg == 0:
        raise CalibrationDataError(
            f"loss 'margin' needs multiple-choice data with correct and wrong options; {calibration.name!r} has "
            f"{n_pos} correct and {n_neg} wrong scored options (use loss=ntp for text, answer_ntp for QA)"
        )
    return positive.double() / n_pos - negative.double() / n_neg


NTP = Loss(
    "ntp",
    "Next-token cross-entropy on every token (the perplexity objective); mean gradient over sequences",
    ntp_per_sample,
    ntp_weights,
)
MARGIN = Loss(
    "margin",
    "Multiple choice: CE on option tokens, gradient g_pos/n_pos - g_neg/n_neg (correct minus wrong options)",
    masked_per_sample,
    margin_weights,
)
ANSWER_NTP = Loss(
    "answer_ntp",
    "Cross-entropy on answer tokens only (prompt masked), for GSM8K-style question/answer data",
    masked_per_sample,
    answer_ntp_weights,
)


@hookimpl
def gisp_losses() -> list[Loss]:
    return [NTP, MARGIN, ANSWER_NTP]
