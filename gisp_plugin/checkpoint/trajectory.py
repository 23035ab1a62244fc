"""The history of a nested pruning run: at which step every structure was pruned.

From a trajectory and the dense model, the subnetwork at any recorded step (any sparsity along the
run) is rebuilt without running the method again. A method removing whole layers records them under
the kind ``"layer"`` like any other structure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gisp_plugin.anatomy.structures import HIDDEN_CHANNEL, WHOLE_LAYER, KeepMask, ModelAnatomy

NEVER = -1


class NotNestedError(ValueError):
    """A step tried to bring back a structure an earlier step had pruned."""


@dataclass
class Trajectory:
    """Steps of a nested run (sparsity and method info per step), each unit's pruning step, and the shape
    constraint the run pruned under (``gisp_plugin.importance.shapes``)."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    pruned_at: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    shape: str = "free"

    def record(self, keep: KeepMask, sparsity: float, **info: Any) -> int:
        """Add the next step; ``keep`` must be nested in the previous step's subnetwork."""
        step = len(self.steps)
        if not self.pruned_at:
            self.pruned_at = {key: torch.full(flags.shape, NEVER, dtype=torch.long) for key, flags in keep.flags.items()}
        for key, flags in keep.flags.items():
            at = self.pruned_at[key]
            if bool((flags & (at != NEVER)).any()):
                raise NotNestedError(f"step {step} keeps a structure of {key} pruned at an earlier step")
            at[(~flags) & (at == NEVER)] = step
        self.steps.append({"step": step, "sparsity": sparsity, **info})
        return step

    def keep_at(self, step: int) -> KeepMask:
        """The subnetwork after ``step`` (structures pruned at or before it are gone)."""
        if not 0 <= step < len(self.steps):
            raise IndexError(f"step {step} not in trajectory of {len(self.steps)} steps")
        return KeepMask({key: (at == NEVER) | (at > step) for key, at in self.pruned_at.items()})

    def step_closest_to(self, sparsity: float) -> int:
        return min(range(len(self.steps)), key=lambda i: abs(self.steps[i]["sparsity"] - sparsity))

    def to_json(self) -> dict[str, Any]:
        layers: dict[str, dict[str, list[int]]] = {}
        for (layer, kind), at in sorted(self.pruned_at.items()):
            layers.setdefault(str(layer), {})[kind] = at.tolist()
        return {"format": "gisp-trajectory/1", "never": NEVER, "shape": self.shape, "steps": self.steps, "pruned_at": layers}

    @classmethod
    def from_json(cls, data: dict[str, Any], anatomy: ModelAnatomy | None = None) -> Trajectory:
        if data.get("format") != "gisp-trajectory/1":
            raise ValueError("not a gisp trajectory (missing format 'gisp-trajectory/1')")
        pruned_at = {
            (int(layer), kind): torch.tensor(values, dtype=torch.long)
            for layer, kinds in data["pruned_at"].items()
            for kind, values in kinds.items()
        }
        if anatomy is not None:
            layers = any(kind == WHOLE_LAYER for _, kind in pruned_at)  # a run that removes whole layers
            hidden = any(kind == HIDDEN_CHANNEL for _, kind in pruned_at)  # a run that removes hidden channels
            expected = {key: flags.shape for key, flags in KeepMask.dense(anatomy, layers, hidden).flags.items()}
            if expected != {key: at.shape for key, at in pruned_at.items()}:
                raise ValueError("trajectory does not match this model's structures")
        return cls(list(data["steps"]), pruned_at, data.get("shape", "free"))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, anatomy: ModelAnatomy | None = None) -> Trajectory:
        return cls.from_json(json.loads(Path(path).read_text()), anatomy)
