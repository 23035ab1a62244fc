"""SLEB: remove whole decoder layers one at a time by calibration perplexity (Song et al. 2024, arXiv 2402.09025;
reference: jiwonsong-dev/SLEB, ``sleb.py``).

At every step each remaining decoder layer is removed in turn, on top of the layers already removed, and
the calibration perplexity of the model without it is measured; the layer whose removal gives the lowest
perplexity goes for good, and the search starts again on the smaller model. Unlike ShortGPT's one-shot
similarity ranking, each choice sees the model as the earlier removals left it. Layers go whole (the
``"layer"`` structure kind): the compacted model has fewer layers, renumbered.

A target is a parameter sparsity (method.md): the number of layers removed is the one whose removal lands
closest to it (ties: fewer), always keeping at least one layer. The subnetworks are nested, and
``job.trajectory`` records one step per removed layer with the perplexity that chose it and the perplexity
of every candidate tried (``tried``).

Options:

- ``early_barrier`` (default 1) and ``latter_barrier`` (default 1): the first and the last that many of
  the layers still present are never candidates, as in the reference code (its defaults); 0 and 0 lets
  the search consider every layer.
- ``batch_size`` (default 8): calibration sequences per forward pass; results do not depend on it.
- ``prefix_replay`` (default true): measure each candidate from its first layer on, the layers below
  replaying one recorded pass (``perplexity_search``); false runs full passes, the reference's way, without
  the memory of one layer's output per calibration batch. Results do not depend on it.

Calibration: the paper's 128 sequences of 2048 tokens of WikiText-2 (``wikitext2``, 128 x 2048). The
reference code joins the first 128 rows of the shuffled WikiText-2 training split (many of them empty)
and cuts the text into 2048-token windows, a few windows in all; we take the windows of the calibration
source as every other method here does. Its score is the summed NLL over those equal windows, which ranks
exactly as the perplexity over all predicted tokens we use (``perplexity_search``).

Cost: one calibration pass per candidate per removed layer, about ``L * k`` passes to remove ``k`` of ``L``
layers, each from the candidate's layer on (the layers below it replay one recorded pass, about half the
work of full passes with the same perplexities); under torchrun each rank measures its share of the
calibration set (``perplexity_search``).

Sample: ``gisp prune --model HuggingFaceTB/SmolLM2-135M --method sleb --sparsity 0.2,0.3``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gisp_baselines.perplexity_search import greedy_removal
from gisp_baselines.shortgpt import layers_for_target, without_layers
from gisp_baselines.walk import pad_token_id
from gisp_plugin.anatomy.structures import ModelAnatomy
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.plugins import hookimpl


@dataclass(frozen=True)
class SlebOptions:
    """Options of SLEB (see the module docstring)."""

    early_barrier: int = 1
    latter_barrier: int = 1
    batch_size: int = 8
    prefix_replay: bool = True

    def __post_init__(self) -> None:  # checked when the options are parsed, before any model is loaded
        for name in ("early_barrier", "latter_barrier"):
            if getattr(self, name) < 0:
                raise ValueError(f"sleb option {name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"sleb option batch_size must be >= 1, got {self.batch_size}")


def candidate_layers(layers: int, removed: list[int], options: SlebOptions) -> list[int]:
    """The layers still present, less the first ``early_barrier`` and the last ``latter_barrier`` of them."""
    alive = [i for i in range(layers) if i not in removed]
    return alive[options.early_barrier : len(alive) - options.latter_barrier]


def max_sparsity(anatomy: ModelAnatomy, options: SlebOptions) -> float:
    """Every layer but the barriers (at least one) removed, the largest layers staying (before any search)."""
    if any(layer.whole is None for layer in anatomy.layers):
        raise ValueError(f"sleb removes whole layers; the {anatomy.adapter} anatomy declares none")
    staying = max(1, options.early_barrier + options.latter_barrier)
    largest = sorted((layer.dense_params for layer in anatomy.layers), reverse=True)[:staying]
    return max(0.0, 1.0 - sum(largest) / anatomy.dense_params)


def run(job: PruningJob) -> Iterator[Subnetwork]:
    options: SlebOptions = job.options
    if job.calibration is None:
        raise ValueError("sleb needs calibration data; pass calibration= or a calibration source")
    layers = len(job.anatomy.layers)
    steps = greedy_removal(
        job,
        candidates=lambda removed: candidate_layers(layers, removed, options) if len(removed) < layers - 1 else [],
        keep_without=lambda removed: without_layers(job.anatomy, removed),
        done=lambda removed: job.anatomy.sparsity(without_layers(job.anatomy, removed)) >= max(job.targets),
        batch_size=options.batch_size,
        pad_id=pad_token_id(job.tokenizer),
        progress="sleb",
        first_layer=(lambda layer: layer) if options.prefix_replay else None,
    )
    order = [step.removed for step in steps]
    counts = [layers_for_target(job.anatomy, order, target) for target in job.targets]
    for count in range(1, max(counts) + 1):  # one trajectory step per removed layer, in removal order
        keep = without_layers(job.anatomy, order[:count])
        step = steps[count - 1]
        sparsity = job.anatomy.sparsity(keep)
        job.trajectory.record(keep, sparsity, removed_layer=step.removed, perplexity=step.perplexity, tried=step.tried)
    for target, count in zip(job.targets, counts, strict=True):
        keep = without_layers(job.anatomy, order[:count])
        job.masked.apply(keep)
        info = {"removal_order": order[:count], "perplexity": [step.perplexity for step in steps[:count]]}
        yield job.subnetwork(target, keep, info=info)


SLEB = MethodSpec(
    name="sleb",
    description="SLEB: whole decoder layers removed one at a time, each the one whose removal raises calibration "
    "perplexity least",
    run=run,
    options=SlebOptions,
    calibration=CalibrationDefaults(source="wikitext2", n_samples=128, seqlen=2048),
    nested=True,
    max_sparsity=max_sparsity,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [SLEB]
