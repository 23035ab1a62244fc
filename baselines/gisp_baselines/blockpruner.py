"""BlockPruner: remove attention and MLP blocks one at a time by calibration perplexity (Zhong et al. 2024,
arXiv 2406.10594; reference: MrGGLS/BlockPruner, ``block_search.py``).

Each decoder layer holds two blocks, its attention (every head) and its MLP (every channel, or every
expert and shared-expert channel of a mixture-of-experts layer). At every step each remaining block is
removed in turn, on top of the blocks already removed, and the calibration perplexity of the model
without it is measured (the paper's block importance); the block whose removal gives the lowest
perplexity goes for good. Candidates are tried attention blocks first, then MLP blocks, each in layer
order, and a tie goes to the earlier one, as in the reference. A removed block is all the units of its
kinds masked (the existing ``attn_head`` and ``mlp_channel`` kinds); a layer whose two blocks are both
gone is removed as a whole (the ``"layer"`` kind), so the compacted model leaves it out.

A target is a parameter sparsity (method.md): the number of blocks removed is the one whose removal lands
closest to it (ties: fewer). The subnetworks are nested and ``job.trajectory`` records one step per
removed block with the perplexity that chose it and that of every candidate tried (``tried``).

Options:

- ``block_type`` (``mix`` | ``attention`` | ``mlp``, default ``mix``): which blocks are candidates (the
  reference's ``--block-type``, whose ``mha`` is our ``attention``).
- ``batch_size`` (default 8): calibration sequences per forward pass; results do not depend on it.
- ``prefix_replay`` (default true): measure each candidate from its first layer on, the layers below
  replaying one recorded pass (``perplexity_search``); false runs full passes, the reference's way, without
  the memory of one layer's output per calibration batch. Results do not depend on it.

Where we differ from the reference, and why:
- The reference drops a removed attention block's input norm (and an MLP block's post-attention norm)
  with it; the norms stay in our compacted layer (a vector of ``hidden_size`` per block, counted in the
  sparsity) until both blocks of the layer are gone and the layer goes whole.
- The reference reports sparsity over every parameter, embeddings included; ours is over the decoder
  layers (method.md), like every method here.
- Calibration: the paper's 256 Alpaca samples, joined and cut into 2048-token windows; Alpaca is not one
  of our sources, so the default is WikiText-2 (the reference's other choice), 32 windows of 2048 tokens (about the
  tokens of 256 Alpaca samples)
  (``--calibration`` chooses another).

Cost: one calibration pass per candidate per removed block, about ``2L * k`` passes to remove ``k`` blocks
of ``L`` layers, each from the block's layer on (the layers below replay one recorded pass, about half the
work of full passes with the same perplexities); under torchrun each rank measures its share (``perplexity_search``).

Sample: ``gisp prune --model HuggingFaceTB/SmolLM2-135M --method blockpruner --sparsity 0.2,0.3``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from gisp_baselines.perplexity_search import greedy_removal
from gisp_baselines.walk import pad_token_id
from gisp_plugin.anatomy.structures import WHOLE_LAYER, KeepMask, ModelAnatomy
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.plugins import hookimpl

Block = tuple[str, int]  # ("attention" | "mlp", layer index)
BLOCK_TYPES = ("mix", "attention", "mlp")


@dataclass(frozen=True)
class BlockPrunerOptions:
    """Options of BlockPruner (see the module docstring)."""

    block_type: Literal["mix", "attention", "mlp"] = "mix"
    batch_size: int = 8
    prefix_replay: bool = True

    def __post_init__(self) -> None:  # checked when the options are parsed, before any model is loaded
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(f"blockpruner option block_type must be one of {', '.join(BLOCK_TYPES)}; got {self.block_type!r}")
        if self.batch_size < 1:
            raise ValueError(f"blockpruner option batch_size must be >= 1, got {self.batch_size}")


def block_kinds(anatomy: ModelAnatomy, block: Block) -> list[str]:
    """The structure kinds of one block: the attention kinds, or every other kind (MLP, experts, shared)."""
    name, index = block
    kinds = anatomy.layers[index].kinds
    return [k for k, kind in kinds.items() if (kind.block == "attention") == (name == "attention")]


def candidate_blocks(anatomy: ModelAnatomy, block_type: str) -> list[Block]:
    """Every block, attention blocks first, then MLP blocks, each in layer order (the reference's order)."""
    layers = range(len(anatomy.layers))
    attention = [("attention", i) for i in layers] if block_type != "mlp" else []
    mlp = [("mlp", i) for i in layers] if block_type != "attention" else []
    return attention + mlp


def without_blocks(anatomy: ModelAnatomy, removed: list[Block]) -> KeepMask:
    """The dense model less the ``removed`` blocks; a layer that lost both blocks is removed whole."""
    keep = KeepMask.dense(anatomy, layers=True)
    for block in removed:
        for kind in block_kinds(anatomy, block):
            keep[block[1], kind] = torch.zeros_like(keep[block[1], kind])
    gone = {index for name, index in removed if name == "attention"} & {index for name, index in removed if name == "mlp"}
    for index in gone:
        keep[index, WHOLE_LAYER] = torch.zeros(1, dtype=torch.bool)
    return keep


def blocks_for_target(anatomy: ModelAnatomy, order: list[Block], target: float) -> int:
    """How many blocks of ``order`` to remove for the sparsity closest to ``target`` (ties: fewer)."""
    sparsities = [anatomy.sparsity(without_blocks(anatomy, order[:count])) for count in range(len(order) + 1)]
    return min(range(len(sparsities)), key=lambda count: (abs(sparsities[count] - target), count))


def max_sparsity(anatomy: ModelAnatomy, options: BlockPrunerOptions) -> float:
    """Every candidate block removed but the last one (a model keeps at least one block)."""
    if any(layer.whole is None for layer in anatomy.layers):
        raise ValueError(f"blockpruner removes whole blocks and layers; the {anatomy.adapter} anatomy declares none")
    blocks = candidate_blocks(anatomy, options.block_type)
    return max(anatomy.sparsity(without_blocks(anatomy, [b for b in blocks if b != kept])) for kept in blocks)


def _label(block: Block) -> str:
    return f"{block[0]}:{block[1]}"


def run(job: PruningJob) -> Iterator[Subnetwork]:
    options: BlockPrunerOptions = job.options
    if job.calibration is None:
        raise ValueError("blockpruner needs calibration data; pass calibration= or a calibration source")
    blocks = candidate_blocks(job.anatomy, options.block_type)
    steps = greedy_removal(
        job,
        candidates=lambda removed: [b for b in blocks if b not in removed] if len(removed) < len(blocks) - 1 else [],
        keep_without=lambda removed: without_blocks(job.anatomy, removed),
        done=lambda removed: job.anatomy.sparsity(without_blocks(job.anatomy, removed)) >= max(job.targets),
        batch_size=options.batch_size,
        pad_id=pad_token_id(job.tokenizer),
        progress="blockpruner",
        first_layer=(lambda block: block[1]) if options.prefix_replay else None,
        label=_label,
    )
    order = [step.removed for step in steps]
    counts = [blocks_for_target(job.anatomy, order, target) for target in job.targets]
    for count in range(1, max(counts) + 1):  # one trajectory step per removed block, in removal order
        keep = without_blocks(job.anatomy, order[:count])
        step = steps[count - 1]
        sparsity = job.anatomy.sparsity(keep)
        job.trajectory.record(keep, sparsity, removed_block=_label(step.removed), perplexity=step.perplexity, tried=step.tried)
    for target, count in zip(job.targets, counts, strict=True):
        keep = without_blocks(job.anatomy, order[:count])
        job.masked.apply(keep)
        info = {"removal_order": [_label(b) for b in order[:count]], "perplexity": [s.perplexity for s in steps[:count]]}
        yield job.subnetwork(target, keep, info=info)


BLOCKPRUNER = MethodSpec(
    name="blockpruner",
    description="BlockPruner: attention and MLP blocks removed one at a time, each the one whose removal raises "
    "calibration perplexity least",
    run=run,
    options=BlockPrunerOptions,
    calibration=CalibrationDefaults(source="wikitext2", n_samples=32, seqlen=2048),
    nested=True,
    max_sparsity=max_sparsity,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [BLOCKPRUNER]
