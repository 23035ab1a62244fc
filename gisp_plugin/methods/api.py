"""What a pruning method is, what it is given, and what it returns.

A method is a ``MethodSpec``: a name, an options dataclass, its default calibration, and a ``run``
function. ``run`` receives a ``PruningJob`` (the dense model wearing removable masks, its anatomy,
the targets, the calibration data) and yields one ``Subnetwork`` per target, in ascending order.
Methods whose subnetworks are nested also record every step in ``job.trajectory``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from gisp_plugin.adapters.api import ArchitectureAdapter
from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationRequest, CalibrationSet
from gisp_plugin.masking.masked_model import MaskedModel


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


@dataclass(frozen=True)
class CalibrationDefaults:
    """The calibration a method's reference implementation uses, applied when the user names none."""

    source: str
    n_samples: int
    seqlen: int


@dataclass
class Subnetwork:
    """One pruned model: which structures remain, and what the method added (FLAP's biases) or changed.

    ``updated_weights`` maps tensor paths (``model.layers.3.mlp.down_proj.weight``) to new dense-shaped
    values of kept weights (SlimGPT's compensation); the masked model and compaction both use them.
    ``elapsed_s`` is the method's own time to reach it; a resumable method sets it to include the
    steps finished before an interruption, otherwise the pruning loop measures it.
    """

    target: float
    keep: KeepMask
    sparsity: float
    extra_biases: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float | None = None
    updated_weights: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PruningJob:
    """Everything a method may use. The model is dense; ``masked`` puts subnetworks on it."""

    model: PreTrainedModel
    tokenizer: Any
    adapter: ArchitectureAdapter
    anatomy: ModelAnatomy
    masked: MaskedModel
    targets: tuple[float, ...]
    options: Any
    calibration: CalibrationSet | None
    seed: int = 0
    work_dir: Path | None = None
    trajectory: Trajectory = field(default_factory=Trajectory)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def subnetwork(self, target: float, keep: KeepMask, **kwargs: Any) -> Subnetwork:
        """Package a decision, measuring its achieved sparsity."""
        return Subnetwork(target, keep.copy(), self.anatomy.sparsity(keep), **kwargs)


@dataclass(frozen=True)
class MethodSpec:
    """A pruning method as registered with the plugin manager.

    ``max_sparsity(anatomy, options)`` tells the largest reachable target (protected layers count);
    ``nested`` says whether one run's subnetworks are nested, so that a trajectory describes them all;
    ``shardable`` says whether the method runs on a model sharded with FSDP2 (``gisp prune --fsdp``): true
    for methods that score through the gradient engine and ``model_scores``, which handle sharded tensors;
    ``sharded_refusal(options)`` says why some of its options cannot (None: they can), before any loading.
    ``check_options(anatomy, options)`` refuses options that cannot work on this model (GISP: more steps
    than prunable structures), with a ``ValueError`` that says what to give; run before any data is read.
    """

    name: str
    description: str
    run: Callable[[PruningJob], Iterator[Subnetwork]]
    options: type = NoOptions
    calibration: CalibrationDefaults | None = None
    nested: bool = False
    max_sparsity: Callable[[ModelAnatomy, Any], float] | None = None
    shardable: bool = False
    sharded_refusal: Callable[[Any], str | None] | None = None
    check_options: Callable[[ModelAnatomy, Any], None] | None = None

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options)]

    def default_calibration_request(self, seed: int = 0) -> CalibrationRequest | None:
        if self.calibration is None:
            return None
        c = self.calibration
        return CalibrationRequest(c.source, c.n_samples, c.seqlen, seed)
