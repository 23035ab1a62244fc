"""Greedy removal by calibration perplexity: the search SLEB and BlockPruner share.

Both methods remove one block at a time; at each step they try every remaining candidate, measure the
perplexity of the calibration set on the model without it (and without the blocks already removed),
and remove the one that raises perplexity least. They differ in what a block is (SLEB: a whole decoder
layer; BlockPruner: the attention or the MLP of one layer) and in which candidates are allowed.

Perplexity here is ``exp(sum of next-token NLL / predicted tokens)`` over every real token of every
calibration sequence (padding excluded). ``CalibrationNll`` keeps the two sums, so batches and
data-parallel ranks combine with ``merge``: under torchrun each rank measures its share and every rank
takes the same decision. On calibration windows of one length (the text corpora) this is the mean of the
per-window mean NLL the references compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.calibration.recorder import batch_size_for
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.data_parallel import merged_over_ranks, rank_share
from gisp_plugin.finite import NonFiniteError
from gisp_plugin.methods.api import PruningJob

Candidate = TypeVar("Candidate")


class CalibrationNll:
    """The sum of next-token negative log-likelihoods over calibration tokens, and their count."""

    def __init__(self) -> None:
        self.nll_sum = torch.zeros((), dtype=torch.float64)
        self.tokens = 0

    def update(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Add one batch: ``logits [batch, seq, vocab]`` for ``input_ids [batch, seq]``; position ``t``
        predicts token ``t + 1`` where both are real (``attention_mask``)."""
        targets = input_ids[:, 1:]
        real = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # [batch, seq - 1]
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        nll = nll.view(targets.shape)[real]
        if not bool(torch.isfinite(nll).all()):
            raise NonFiniteError("the model gives inf or NaN logits on the calibration data")
        self.nll_sum += nll.double().sum().cpu()
        self.tokens += int(real.sum())

    def merge(self, other: CalibrationNll) -> None:
        """Fold another accumulator (another batch range, another rank) into this one."""
        self.nll_sum += other.nll_sum.cpu()
        self.tokens += other.tokens

    @property
    def mean(self) -> float:
        """Mean NLL per predicted token."""
        if self.tokens == 0:
            raise ValueError("calibration perplexity needs sequences of at least 2 tokens")
        return float(self.nll_sum) / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)


@torch.no_grad()
def calibration_nll(model: nn.Module, calibration: CalibrationSet, batch_size: int = 8, pad_id: int = 0) -> CalibrationNll:
    """NLL sums of ``model`` as it is (masks included) over ``calibration``, merged over data-parallel ranks."""
    share, _ = rank_share(calibration)
    totals = CalibrationNll()
    device = next(model.parameters()).device
    for batch in share.batches(batch_size_for(share, batch_size), pad_id):
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        totals.update(logits, batch.input_ids, batch.attention_mask)
    return merged_over_ranks({"nll": totals})["nll"]


@dataclass(frozen=True)
class SearchStep:
    """One removal: the candidate chosen and the calibration perplexity of every candidate tried."""

    removed: Any
    perplexity: float
    tried: dict[str, float]


def greedy_removal(
    job: PruningJob,
    candidates: Callable[[list[Candidate]], Sequence[Candidate]],
    keep_without: Callable[[list[Candidate]], KeepMask],
    done: Callable[[list[Candidate]], bool],
    batch_size: int,
    pad_id: int,
    label: Callable[[Candidate], str] = str,
) -> list[SearchStep]:
    """Remove candidates one at a time until ``done(removed)``, each time the one whose removal (on top of
    those already removed) gives the lowest calibration perplexity; ties go to the earlier candidate.

    ``candidates(removed)`` lists what may go next, in order; ``keep_without(removed)`` is the subnetwork
    without them. Each step costs one calibration pass per candidate.
    """
    removed: list[Candidate] = []
    steps: list[SearchStep] = []
    while not done(removed):
        options = list(candidates(removed))
        if not options:
            break
        tried: dict[str, float] = {}
        best, best_nll = None, math.inf
        for candidate in options:
            job.masked.apply(keep_without([*removed, candidate]))
            nll = calibration_nll(job.model, job.calibration, batch_size, pad_id).mean
            tried[label(candidate)] = math.exp(nll)
            if nll < best_nll:
                best, best_nll = candidate, nll
        removed.append(best)
        steps.append(SearchStep(best, math.exp(best_nll), tried))
    job.masked.apply(keep_without(removed))
    return steps
