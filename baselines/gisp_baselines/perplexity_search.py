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

Every candidate of a step shares the model below its first decoder layer (the step's model, the blocks
already removed gone), so the search runs that prefix once per step, not once per candidate
(``PrefixReplay``): candidates are measured in the order of their first layer, the output of the layer
before it is recorded once per calibration batch, and the layers below replay it instead of computing.
The perplexities are those of full passes (the same operations on the same inputs); the first step checks
this on one candidate and falls back to full passes, with a warning, where the model is not a plain
chain of layers (a hook that changes a layer's output, say). It removes about half the decoder work:
``L`` layers cost ``L / 2`` per candidate on average instead of ``L``; the memory is one layer's output
for this rank's calibration share.

With a work folder (``gisp prune``'s run folder, ``gisp compare``'s ``--out``) every finished removal is
saved (``search-state.json``), so an interrupted search resumes after its last finished removal.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.calibration.recorder import batch_size_for
from gisp_plugin.checkpoint.method_state import job_fingerprint, read_state, write_state
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.context import current_setup
from gisp_plugin.distributed.data_parallel import from_main, merged_over_ranks, rank_share
from gisp_plugin.finite import NonFiniteError
from gisp_plugin.methods.api import PruningJob

Candidate = TypeVar("Candidate")
log = logging.getLogger(__name__)
STATE_FILE = "search-state.json"
STATE_FORMAT = "perplexity-search/1"
# a recorded prefix must give a full pass's mean NLL to this relative precision (identical kernels give it exactly)
REPLAY_RTOL = 1e-6


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
    with parametrize.cached():  # a masked weight is computed once per pass, not once per batch
        for batch in share.batches(batch_size_for(share, batch_size), pad_id):
            batch = batch.to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            totals.update(logits, batch.input_ids, batch.attention_mask)
    return merged_over_ranks({"nll": totals})["nll"]


class _PrefixDone(Exception):
    """Raised by the hook that records a layer's output: the rest of the pass is not needed."""


def _copied(output: Any) -> Any:
    """A copy of a decoder layer's output (a tensor or a tuple of them), so no later layer can change the record."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(_copied(part) for part in output)
    return output


@contextmanager
def _replaying(layers: Sequence[nn.Module], below: int, output: Any) -> Iterator[None]:
    """Layers ``[0, below)`` return a copy of ``output`` (the recorded output of layer ``below - 1``) without
    computing. Each layer hands its output to the next, so layer ``below`` receives what a full pass gives it."""
    saved = [layer.__dict__.get("forward") for layer in layers[:below]]
    for layer in layers[:below]:
        layer.forward = lambda *args, **kwargs: _copied(output)
    try:
        yield
    finally:
        for layer, forward in zip(layers[:below], saved, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


class PrefixReplay:
    """Calibration passes of one search step that compute only from a given decoder layer on.

    ``outputs[b]`` is the output of layer ``start - 1`` on batch ``b`` under the step's model; ``advance``
    moves ``start`` up by running the layers in between (one batch at a time, stopping the pass there).
    """

    def __init__(self, model: nn.Module, layers: Sequence[nn.Module], calibration: CalibrationSet, batch_size: int, pad_id: int):
        self.model = model
        self.layers = layers
        device = next(model.parameters()).device
        share, _ = rank_share(calibration)
        self.batches = [b.to(device) for b in share.batches(batch_size_for(share, batch_size), pad_id)]
        self.start = 0
        self.outputs: list[Any] = [None] * len(self.batches)

    def _forward(self, index: int) -> Any:
        batch = self.batches[index]
        with _replaying(self.layers, self.start, self.outputs[index]):
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    @torch.no_grad()
    def advance(self, start: int) -> None:
        """Record the output of layer ``start - 1`` for every batch; the model must be the step's model."""
        if start <= self.start:
            return
        recorded: list[Any] = []

        def record(module: nn.Module, args: Any, output: Any) -> None:
            recorded.append(_copied(output))
            raise _PrefixDone

        handle = self.layers[start - 1].register_forward_hook(record)
        try:
            with parametrize.cached():
                for index in range(len(self.batches)):
                    with suppress(_PrefixDone):
                        self._forward(index)
        finally:
            handle.remove()
        self.start, self.outputs = start, recorded

    @torch.no_grad()
    def nll(self) -> CalibrationNll:
        """NLL sums of the model as it is now over this rank's batches, merged over ranks; the layers below
        ``start`` must be those of the step's model."""
        totals = CalibrationNll()
        with parametrize.cached():
            for index, batch in enumerate(self.batches):
                totals.update(self._forward(index).logits, batch.input_ids, batch.attention_mask)
        return merged_over_ranks({"nll": totals})["nll"]


@dataclass(frozen=True)
class SearchStep:
    """One removal: the candidate chosen and the calibration perplexity of every candidate tried."""

    removed: Any
    perplexity: float
    tried: dict[str, float]


def _step_by_replay(
    job: PruningJob,
    options: list[Candidate],
    removed: list[Candidate],
    keep_without: Callable[[list[Candidate]], KeepMask],
    first_layer: Callable[[Candidate], int],
    replay: PrefixReplay,
    bar: tqdm,
) -> list[float]:
    """The mean NLL without each of ``options`` (on top of ``removed``), measured in the order of their first layer."""
    means = [math.nan] * len(options)
    for index in sorted(range(len(options)), key=lambda i: first_layer(options[i])):
        if first_layer(options[index]) > replay.start:
            job.masked.apply(keep_without(removed))
            replay.advance(first_layer(options[index]))
        job.masked.apply(keep_without([*removed, options[index]]))
        means[index] = replay.nll().mean
        bar.update(1)
    return means


def _replay_matches_full_pass(
    job: PruningJob,
    options: list[Candidate],
    removed: list[Candidate],
    keep_without: Callable,
    means: list[float],
    first_layer: Callable[[Candidate], int],
    batch_size: int,
    pad_id: int,
) -> bool:
    """Whether the candidate with the longest replayed prefix has the mean NLL of a full pass."""
    index = max(range(len(options)), key=lambda i: first_layer(options[i]))
    job.masked.apply(keep_without([*removed, options[index]]))
    full = calibration_nll(job.model, job.calibration, batch_size, pad_id).mean
    return abs(means[index] - full) <= REPLAY_RTOL * abs(full)


def _resumed(
    job: PruningJob,
    fingerprint: str,
    candidates: Callable[[list[Candidate]], Sequence[Candidate]],
    done: Callable[[list[Candidate]], bool],
    label: Callable[[Candidate], str],
) -> list[SearchStep]:
    """The steps an interrupted identical search saved in the work folder (rank 0 reads), as far as this
    search goes; each recorded removal must be one of that step's candidates."""
    state = from_main(lambda: read_state(job.work_dir, STATE_FILE, STATE_FORMAT, fingerprint))
    removed: list[Candidate] = []
    steps: list[SearchStep] = []
    for entry in (state or {}).get("steps", []):
        if done(removed):
            break
        by_label = {label(candidate): candidate for candidate in candidates(removed)}
        if entry.get("removed") not in by_label:
            log.warning("ignoring %s: step %d is not one of its candidates; starting over", STATE_FILE, len(steps) + 1)
            return []
        removed.append(by_label[entry["removed"]])
        steps.append(SearchStep(removed[-1], entry["perplexity"], entry["tried"]))
    if steps:
        log.info("%s: resuming from %s after %d removals", job.anatomy.adapter, job.work_dir, len(steps))
    return steps


def _save(job: PruningJob, fingerprint: str, steps: list[SearchStep], label: Callable[[Candidate], str]) -> None:
    if current_setup().is_main:
        fields = {"steps": [{"removed": label(s.removed), "perplexity": s.perplexity, "tried": s.tried} for s in steps]}
        write_state(job.work_dir, STATE_FILE, STATE_FORMAT, fingerprint, fields)


def greedy_removal(
    job: PruningJob,
    candidates: Callable[[list[Candidate]], Sequence[Candidate]],
    keep_without: Callable[[list[Candidate]], KeepMask],
    done: Callable[[list[Candidate]], bool],
    batch_size: int,
    pad_id: int,
    first_layer: Callable[[Candidate], int] | None,
    label: Callable[[Candidate], str] = str,
    progress: str | None = None,
) -> list[SearchStep]:
    """Remove candidates one at a time until ``done(removed)``, each time the one whose removal (on top of
    those already removed) gives the lowest calibration perplexity; ties go to the earlier candidate.

    ``candidates(removed)`` lists what may go next, in order; ``keep_without(removed)`` is the subnetwork
    without them; ``first_layer(candidate)`` is the lowest decoder layer its removal changes (the model
    below it is shared, ``PrefixReplay``; None: full passes). Each step costs one calibration pass per
    candidate, from its first layer on. ``progress`` names a bar over each step's passes (rank 0, a terminal).
    With a work folder the steps are saved as they finish (``STATE_FILE``), and a rerun of the same search
    (same weights, options and data; any targets) starts after them.
    """
    layers = job.adapter.decoder_layers(job.model)
    fingerprint = job_fingerprint(job, with_targets=False)
    steps = _resumed(job, fingerprint, candidates, done, label)
    removed = [step.removed for step in steps]
    replays, checked = first_layer is not None, False
    while not done(removed):
        options = list(candidates(removed))
        if not options:
            break
        hidden = True if progress is None or not current_setup().is_main else None
        bar = tqdm(total=len(options), desc=f"{progress}: removal {len(removed) + 1}", leave=False, disable=hidden)
        if replays:
            replay = PrefixReplay(job.model, layers, job.calibration, batch_size, pad_id)
            means = _step_by_replay(job, options, removed, keep_without, first_layer, replay, bar)
            if not checked and not _replay_matches_full_pass(
                job, options, removed, keep_without, means, first_layer, batch_size, pad_id
            ):
                log.warning("the %s model is not a plain chain of decoder layers: full passes", job.anatomy.adapter)
                replays = False
                bar.reset()
            checked = True
        if not replays:
            means = []
            for candidate in options:
                job.masked.apply(keep_without([*removed, candidate]))
                means.append(calibration_nll(job.model, job.calibration, batch_size, pad_id).mean)
                bar.update(1)
        bar.close()
        best = min(range(len(options)), key=lambda i: (means[i], i))
        removed.append(options[best])
        tried = {label(candidate): math.exp(mean) for candidate, mean in zip(options, means, strict=True)}
        steps.append(SearchStep(options[best], math.exp(means[best]), tried))
        _save(job, fingerprint, steps, label)
    job.masked.apply(keep_without(removed))
    return steps
