"""LLM-Pruner, block-wise (reference: horseee/LLM-Pruner, ``hf_prune.py`` / ``llama3.py`` with
``--block_wise --pruner_type taylor``, and ``LLMPruner/pruner/hf_llama_pruner.py``).

1. One gradient pass over the calibration set (next-token loss; the shared engine in
   ``gisp_plugin.importance.gradients``); ``param_second`` / ``param_mix`` also sum the squared
   per-sample gradients, one sequence at a time, as the reference does.
2. Taylor importance of every group (``gisp_baselines.taylor``): heads (``q/k/v`` rows + ``o``
   columns; under GQA a whole key/value group by default), MLP channels (``gate/up`` rows + ``down``
   column), and in mixture-of-experts layers the channels inside each routed expert and of the shared
   expert (an expert goes when its last channel does; the reference has no MoE support).
3. Local and uniform: every layer in the pruned range loses the same fraction of its head groups and
   of its channels, the lowest-importance ones. Layers outside ``layer_start .. layer_end`` are kept
   whole (reference: ``4 .. L-3`` for Llama-7B's 32 layers, i.e. ``range(4, 30)``). One shot: the
   subnetworks of one run are nested, so the trajectory describes every target.

Where we follow the reference code: ``param_first`` by default (the ``llama3.py`` default and the
README's commands; ``hf_prune.py``'s argparse default is ``param_mix``), the group sum, the layer range,
weights only (no biases) in the score. Where we differ, and why: targets are parameter sparsity of the
decoder layers (method.md): the per-layer fraction is chosen so that the model-level sparsity is
closest to the target (the reference's ``pruning_ratio`` is the per-layer channel fraction); GQA query
heads are paired with their key/value head the way the model computes them (see ``taylor``).
Recovery fine-tuning with LoRA is a separate, method-agnostic step (``gisp_plugin.recovery``).

Options: ``taylor`` (param_first, param_second, param_mix, vectorize), ``head_unit`` (kv_group,
query_head), ``layer_start`` (default 4), ``layer_end`` (exclusive, negative counts from the end;
default -2), ``loss`` (default ntp), ``batch_size`` (2), ``gradient_checkpointing`` (false).
Sample: ``gisp prune --method llm_pruner --sparsity 0.2 -o taylor=param_first --n-samples 10 --seqlen 64``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from gisp_baselines.taylor import gradient_weight_paths, group_scores
from gisp_baselines.walk import pad_token_id
from gisp_plugin.anatomy.structures import ModelAnatomy
from gisp_plugin.importance.gradients import accumulate_gradients
from gisp_plugin.importance.taylor import needs_squares, sharding_refusal
from gisp_plugin.importance.uniform import keep_lowest, ratio_for_target
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.plugins import hookimpl
from gisp_plugin.plugins.manager import lookup


@dataclass(frozen=True)
class LlmPrunerOptions:
    """Options of LLM-Pruner (see the module docstring)."""

    taylor: Literal["param_first", "param_second", "param_mix", "vectorize"] = "param_first"
    head_unit: Literal["kv_group", "query_head"] = "kv_group"
    layer_start: int = 4
    layer_end: int = -2
    loss: str = "ntp"
    batch_size: int = 2
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:  # checked when the options are parsed, before any model is loaded
        if self.batch_size < 1:
            raise ValueError(f"llm_pruner option batch_size must be >= 1, got {self.batch_size}")
        lookup("loss", self.loss)  # an unknown name fails here, listing the available losses


def pruned_layers(n_layers: int, options: LlmPrunerOptions) -> list[int]:
    """The layers LLM-Pruner may prune: ``range(layer_start, layer_end)``, negative ends from the back."""
    end = options.layer_end if options.layer_end >= 0 else n_layers + options.layer_end
    layers = list(range(max(options.layer_start, 0), min(end, n_layers)))
    if not layers:
        raise ValueError(
            f"llm_pruner layer range layer_start={options.layer_start}, layer_end={options.layer_end} is empty "
            f"for a model of {n_layers} layers; set layer_start/layer_end (e.g. layer_start=0 layer_end={n_layers})"
        )
    return layers


def max_sparsity(anatomy: ModelAnatomy, options: LlmPrunerOptions) -> float:
    return anatomy.max_sparsity(pruned_layers(len(anatomy.layers), options))


def run(job: PruningJob) -> Iterator[Subnetwork]:
    options: LlmPrunerOptions = job.options
    if job.calibration is None:
        raise ValueError("llm_pruner needs calibration data; pass calibration= or a calibration source")
    layers = pruned_layers(len(job.anatomy.layers), options)
    sums = accumulate_gradients(
        job.model,
        gradient_weight_paths(job.anatomy, layers, options.head_unit),
        job.calibration,
        lookup("loss", options.loss),
        batch_size=options.batch_size,
        per_sample_squares=needs_squares(options.taylor),
        gradient_checkpointing=options.gradient_checkpointing,
        pad_token_id=pad_token_id(job.tokenizer),
        progress="llm_pruner gradients",
    )
    scores, groups = group_scores(job.model, job.anatomy, layers, sums, options.taylor, options.head_unit)
    del sums
    for target in job.targets:
        ratio = ratio_for_target(job.anatomy, groups, target, scores)
        keep = keep_lowest(job.anatomy, scores, ratio, groups)
        job.masked.apply(keep)
        sparsity = job.anatomy.sparsity(keep)
        job.trajectory.record(keep, sparsity, target=target, ratio=ratio)
        yield job.subnetwork(target, keep, info={"ratio": ratio, "layers": [layers[0], layers[-1]]})


LLM_PRUNER = MethodSpec(
    name="llm_pruner",
    description="LLM-Pruner (block-wise): Taylor importance of head/kv groups and MLP channels, same ratio in layers 4..L-3",
    run=run,
    options=LlmPrunerOptions,
    calibration=CalibrationDefaults(source="c4", n_samples=10, seqlen=64),
    nested=True,
    shardable=True,
    sharded_refusal=sharding_refusal,
    max_sparsity=max_sparsity,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [LLM_PRUNER]
