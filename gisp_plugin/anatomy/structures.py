"""The prunable structures of a model, described independently of any pruning method.

A model is a list of decoder layers; each layer holds one or more *structure kinds* (attention heads,
MLP channels, and whatever an adapter adds later, such as experts). A kind owns, for each of its
``count`` units, a run of ``width`` rows or columns in some tensors. Everything a method needs to
score, mask, count or compact structures follows from that declaration.

A decoder layer is also a structure of its own, the ``"layer"`` kind (``LayerAnatomy.whole``): one unit
owning everything the layer holds. It lives beside the within-layer kinds, not among them, so methods that
rank heads and channels never see it; only a method that removes whole layers (ShortGPT) sets its flags.
A ``KeepMask`` carries a layer flag only when such a method put one there, and a layer without a flag is
kept, so the masks, records and trajectories of every other method are exactly what they were.

The residual stream's width is one model-level structure, the ``"hidden_channel"`` kind
(``ModelAnatomy.hidden``, see ``anatomy.hidden``): a channel owns its index in every tensor that reads or
writes the stream, in every layer, the norms and the embeddings. Its flags sit under the key
``(MODEL_LEVEL, "hidden_channel")``, again only when a method sets them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gisp_plugin.anatomy.hidden import HiddenDimension


@dataclass(frozen=True)
class TensorSlice:
    """A run of ``width`` indices along ``axis`` of a tensor for each structure unit, from ``offset`` on.

    ``path`` is relative to the decoder layer module, e.g. ``"self_attn.q_proj.weight"``. Unit ``u``
    owns indices ``offset + u * width`` to ``offset + (u + 1) * width`` along ``axis``; a fused tensor
    (Phi-3's ``qkv_proj``, ``gate_up_proj``) carries several slices at different offsets.

    ``stacked`` > 0 says dim 0 stacks that many experts (``gate_up_proj[E, 2I, H]``): the units are
    numbered expert by expert, each expert's units cut its own sub-tensor the same way.
    """

    path: str
    axis: int
    width: int
    offset: int = 0
    stacked: int = 0

    @property
    def module_path(self) -> str:
        return self.path.rsplit(".", 1)[0]

    @property
    def tensor_name(self) -> str:
        return self.path.rsplit(".", 1)[1]

    @property
    def is_bias(self) -> bool:
        return self.tensor_name == "bias"

    def per_stack(self, count: int) -> int:
        """Units in each stacked expert (all ``count`` when nothing is stacked)."""
        return count // self.stacked if self.stacked else count

    def stop(self, count: int) -> int:
        """The first index along ``axis`` after the last of the units (in each expert, if stacked)."""
        return self.offset + self.per_stack(count) * self.width

    def along_axis(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every dimension but ``axis`` (and the expert dim, if stacked)."""
        kept = (0, self.axis) if self.stacked else (self.axis,)
        other = [d for d in range(tensor.dim()) if d not in kept]
        return tensor.sum(other) if other else tensor

    def per_unit(self, values: torch.Tensor, count: int) -> torch.Tensor:
        """The values ``along_axis`` gives that belong to the units, shaped ``[count, width]``."""
        return values[..., self.offset : self.stop(count)].reshape(count, self.width)

    def params_per_unit(self, shape: torch.Size) -> int:
        """Elements of a tensor of ``shape`` that one unit owns."""
        return self.width * (math.prod(shape) // shape[self.axis] // (shape[0] if self.stacked else 1))

    def keep_mask(self, flags: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A bool mask broadcastable to ``shape``: False on the indices of units whose flag is False."""
        rows = self.stacked or 1
        along = torch.ones(rows, shape[self.axis], dtype=torch.bool, device=flags.device)
        along[:, self.offset : self.stop(flags.numel())] = flags.reshape(rows, -1).repeat_interleave(self.width, dim=1)
        view = [1] * len(shape)
        view[self.axis] = shape[self.axis]
        if self.stacked:
            view[0] = rows
        return along.reshape(view)


@dataclass(frozen=True)
class DependentSlice:
    """A tensor slice that lives as long as any of the units that read it.

    Under grouped-query attention the key/value head ``j`` serves the query heads ``readers[j]``;
    it disappears only when all of them are pruned.
    """

    slice: TensorSlice
    readers: tuple[tuple[int, ...], ...]
    params_per_unit: int

    def alive(self, keep: torch.Tensor) -> torch.Tensor:
        """Which dependent units survive, given the keep flags of the owning kind (bool ``[count]``)."""
        return torch.stack([keep[list(r)].any() for r in self.readers]) if self.readers else keep[:0]


@dataclass(frozen=True)
class StructureKind:
    """One family of prunable units inside one decoder layer.

    ``block`` names the block type used for block-wise normalisation (``"attention"``, ``"mlp"``).
    ``owned`` are the slices each unit owns outright (scored and masked with the unit);
    ``dependents`` are slices shared by several units (masked when all their readers are gone).
    ``router`` names a router module (relative to the layer) whose weight rows are the first of the
    dependents: a mixture-of-experts layer whose expert lost every channel never routes to it again. The
    dependents after them are the router's other per-expert tensors (a score-correction bias), if any.
    """

    name: str
    block: str
    count: int
    owned: tuple[TensorSlice, ...]
    params_per_unit: int
    dependents: tuple[DependentSlice, ...] = ()
    router: str | None = None

    @property
    def router_rows(self) -> DependentSlice | None:
        """The dependent router rows (one per expert), if this kind lives inside routed experts."""
        if self.router is None:
            return None
        return self.dependents[0]

    @property
    def router_tensors(self) -> tuple[DependentSlice, ...]:
        """Every per-expert tensor of the router (its weight rows first), one entry per expert each."""
        return self.dependents if self.router is not None else ()

    def params_kept(self, keep: torch.Tensor) -> int:
        """Parameters this kind still holds when only the units flagged in ``keep`` remain."""
        kept = int(keep.sum()) * self.params_per_unit
        for dep in self.dependents:
            kept += int(dep.alive(keep).sum()) * dep.params_per_unit
        return kept

    @property
    def dense_params(self) -> int:
        return self.params_kept(torch.ones(self.count, dtype=torch.bool))


WHOLE_LAYER = "layer"
HIDDEN_CHANNEL = "hidden_channel"
MODEL_LEVEL = -1  # the "layer" index under which model-level kinds (the hidden dimension) are keyed


@dataclass(frozen=True)
class LayerAnatomy:
    """The structure kinds of one decoder layer and the parameters no method can remove (norms).

    ``whole`` is the layer as one unit of kind ``"layer"``: it owns every parameter of the layer, norms
    included (``params_per_unit == dense_params``), and its slices are the tensors that write into the
    residual stream, whose zeroing makes the layer the identity. ``None`` where an adapter declares no
    whole-layer structure.
    """

    index: int
    prefix: str
    kinds: dict[str, StructureKind]
    fixed_params: int
    whole: StructureKind | None = None

    @property
    def dense_params(self) -> int:
        return self.fixed_params + sum(k.dense_params for k in self.kinds.values())


@dataclass(frozen=True)
class ModelAnatomy:
    """Every decoder layer's prunable structures, with exact parameter accounting.

    Sparsity follows the paper: ``1 - params left in the decoder layers / dense decoder params``;
    embeddings and the LM head are not counted (a hidden channel removes its share of the decoder layers,
    and its embedding and LM-head columns go uncounted). ``hidden`` is the model-level hidden dimension,
    ``None`` where the adapter declares none. ``shape`` is the run's shape constraint (``free``, or one
    of ``gisp_plugin.importance.shapes.SHAPES``), which the shared allocators read.
    """

    adapter: str
    layers: tuple[LayerAnatomy, ...]
    kind_names: tuple[str, ...] = field(default=("attn_head", "mlp_channel"))
    hidden: HiddenDimension | None = None
    shape: str = "free"

    @property
    def dense_params(self) -> int:
        return sum(layer.dense_params for layer in self.layers)

    def kind(self, layer: int, name: str) -> StructureKind:
        if name == WHOLE_LAYER:
            return self.whole_layer(layer)
        if name == HIDDEN_CHANNEL:
            return self.hidden_dimension().kind
        return self.layers[layer].kinds[name]

    def hidden_dimension(self) -> HiddenDimension:
        """The model-level hidden dimension (refused where the adapter declares none)."""
        if self.hidden is None:
            raise LookupError(f"the {self.adapter} anatomy declares no hidden dimension; hidden channels cannot be removed")
        return self.hidden

    def whole_layer(self, layer: int) -> StructureKind:
        """The ``"layer"`` structure of decoder layer ``layer`` (refused where the adapter declares none)."""
        whole = self.layers[layer].whole
        if whole is None:
            raise LookupError(f"the {self.adapter} anatomy declares no whole-layer structure; layers cannot be removed")
        return whole

    def params_kept(self, keep: KeepMask) -> int:
        """Parameters left in the decoder layers; a removed layer leaves none, whatever its other flags say."""
        if keep.hidden_pruned():
            return self.hidden_dimension().params_kept(self, keep)
        return sum(
            layer.fixed_params + sum(kind.params_kept(keep[layer.index, name]) for name, kind in layer.kinds.items())
            for layer in self.layers
            if keep.layer_kept(layer.index)
        )

    def sparsity(self, keep: KeepMask) -> float:
        return 1.0 - self.params_kept(keep) / self.dense_params

    def max_sparsity(self, prunable_layers: list[int] | None = None, blocks: set[str] | None = None) -> float:
        """The sparsity reached when every unit of the given layers (default: all) and blocks is pruned."""
        keep = KeepMask.dense(self)
        for idx in range(len(self.layers)) if prunable_layers is None else prunable_layers:
            for name, kind in self.layers[idx].kinds.items():
                if blocks is None or kind.block in blocks:
                    keep[idx, name] = torch.zeros_like(keep[idx, name])
        return self.sparsity(keep)

    def units(self) -> list[tuple[int, str]]:
        """Every (layer, kind) pair, in layer order."""
        return [(layer.index, name) for layer in self.layers for name in layer.kinds]


class KeepMask:
    """Which units of every (layer, kind) remain: a bool vector per pair.

    This is the one currency in which methods state decisions; masks on the model, compaction,
    trajectories and saved records are all derived from it. Whole layers are flagged under the kind
    ``"layer"`` (one unit per layer); a layer without such a flag is kept. Hidden channels are flagged under
    ``(MODEL_LEVEL, "hidden_channel")``; a mask without that key keeps them all.
    """

    def __init__(self, flags: dict[tuple[int, str], torch.Tensor]):
        self.flags = {key: value.to(torch.bool).cpu() for key, value in flags.items()}

    @classmethod
    def dense(cls, anatomy: ModelAnatomy, layers: bool = False, hidden: bool = False) -> KeepMask:
        """Everything kept; with ``layers``, every decoder layer also carries its (kept) ``"layer"`` flag;
        with ``hidden``, the model carries its (kept) hidden-channel flags."""
        flags = {
            (layer.index, name): torch.ones(kind.count, dtype=torch.bool)
            for layer in anatomy.layers
            for name, kind in layer.kinds.items()
        }
        if layers:
            for layer in anatomy.layers:
                flags[layer.index, WHOLE_LAYER] = torch.ones(anatomy.whole_layer(layer.index).count, dtype=torch.bool)
        if hidden:
            flags[MODEL_LEVEL, HIDDEN_CHANNEL] = torch.ones(anatomy.hidden_dimension().kind.count, dtype=torch.bool)
        return cls(flags)

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        if key[1] == WHOLE_LAYER and key not in self.flags:
            return torch.ones(1, dtype=torch.bool)  # no flag: the layer is kept
        return self.flags[key]

    def __setitem__(self, key: tuple[int, str], value: torch.Tensor) -> None:
        if key not in self.flags and (key[1] != WHOLE_LAYER or not any(layer == key[0] for layer, _ in self.flags)):
            raise KeyError(f"no structure kind {key[1]!r} in layer {key[0]}")
        shape = self.flags[key].shape if key in self.flags else (1,)  # a layer's first flag: one unit
        if value.shape != shape:
            raise ValueError(f"keep flags for {key} need shape {tuple(shape)}, got {tuple(value.shape)}")
        self.flags[key] = value.to(torch.bool).cpu()

    def hidden_pruned(self) -> bool:
        """True when some hidden channel is removed."""
        flags = self.flags.get((MODEL_LEVEL, HIDDEN_CHANNEL))
        return flags is not None and not bool(flags.all())

    def layer_kept(self, layer: int) -> bool:
        """False only when decoder layer ``layer`` is removed as a whole."""
        return bool(self[layer, WHOLE_LAYER].all())

    def removed_layers(self) -> list[int]:
        """Decoder layers removed as a whole, in order."""
        return sorted(layer for (layer, name), value in self.flags.items() if name == WHOLE_LAYER and not bool(value.all()))

    def copy(self) -> KeepMask:
        return KeepMask({key: value.clone() for key, value in self.flags.items()})

    def _keys(self, other: KeepMask) -> set[tuple[int, str]]:
        return set(self.flags) | set(other.flags)

    def _pair(self, other: KeepMask, key: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both masks' flags for ``key``; missing hidden-channel flags are all kept, like the other's."""
        if key[1] == HIDDEN_CHANNEL and (key not in self.flags or key not in other.flags):
            flags = self.flags.get(key, other.flags.get(key))
            return self.flags.get(key, torch.ones_like(flags)), other.flags.get(key, torch.ones_like(flags))
        return self[key], other[key]

    def is_subset_of(self, other: KeepMask) -> bool:
        """True when every unit kept here is also kept in ``other`` (nested subnetworks)."""
        pairs = (self._pair(other, key) for key in self._keys(other))
        return not any(bool((mine & ~theirs).any()) for mine, theirs in pairs)

    def num_pruned(self) -> int:
        return sum(int((~value).sum()) for value in self.flags.values())

    def __eq__(self, other: object) -> bool:
        """The same subnetwork (a missing layer flag equals a kept one)."""
        if not isinstance(other, KeepMask):
            return False
        try:
            return all(torch.equal(*self._pair(other, key)) for key in self._keys(other))
        except KeyError:
            return False

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        """Pruned unit indices per layer and kind: compact for the usual case of few pruned units."""
        out: dict[str, dict[str, list[int]]] = {}
        for (layer, name), value in sorted(self.flags.items()):
            out.setdefault(str(layer), {})[name] = (~value).nonzero().flatten().tolist()
        return out

    @classmethod
    def from_json(cls, anatomy: ModelAnatomy, data: dict[str, dict[str, list[int]]]) -> KeepMask:
        layers = any(WHOLE_LAYER in kinds for kinds in data.values())
        keep = cls.dense(anatomy, layers=layers, hidden=any(HIDDEN_CHANNEL in kinds for kinds in data.values()))
        for layer, kinds in data.items():
            for name, pruned in kinds.items():
                flags = keep[int(layer), name].clone()
                flags[pruned] = False
                keep[int(layer), name] = flags
        return keep
