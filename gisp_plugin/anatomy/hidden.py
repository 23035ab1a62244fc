"""The hidden dimension (the residual stream's width) as one model-level structure kind, derived.

A hidden channel ``c`` owns index ``c`` of every tensor that reads or writes the residual stream: a column
of every projection that reads it (q/k/v, gate/up, routers, routed experts' ``gate_up``, a shared-expert
gate, the LM head), a row of every projection that writes it (o, down, routed experts' ``down``, their
biases), its entry in every norm weight over the stream (every layer's and the final one) and its column of
the token embedding. Nothing here names a family or a tensor: the slices are read off the live tensors.

- In a decoder layer, the layer kinds already say which axis of a tensor their units cut (a head's rows
  of ``q_proj``, a channel's column of ``down_proj``, an expert's dim 0); the hidden axis is the one other
  axis as long as the stream is wide. A tensor no kind cuts (a norm, ``o_proj``'s bias, a shared-expert
  gate) has its hidden axis where its size is the stream's width. Two candidate axes are refused.
- Outside the layers, the embedding and the LM head are found with ``get_input_embeddings`` and
  ``get_output_embeddings`` (a tied head is the embedding's tensor, cut once), and every other tensor as
  wide as the stream is a norm weight (the final norm).

Counting follows the paper's sparsity (decoder layers only): a removed channel takes its share of every
decoder tensor with it, exactly (a tensor of ``n`` elements with a hidden axis keeps ``n / H * H'``);
its embedding and LM-head columns are cut in the compacted model but, like today, not counted.

Masking a channel zeroes its embedding column and its norm entries, so the channel is 0 in the residual
stream from the first layer on, and its reader columns and writer rows. The compacted model drops the
channel everywhere; ``compaction.hidden`` explains how it keeps every norm's output exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gisp_plugin.anatomy.structures import (
    HIDDEN_CHANNEL,
    MODEL_LEVEL,
    KeepMask,
    LayerAnatomy,
    ModelAnatomy,
    StructureKind,
    TensorSlice,
)
from gisp_plugin.masking.sparsifier import dense_tensor

HIDDEN_BLOCK = "hidden"


@dataclass(frozen=True)
class LayerShare:
    """One decoder layer's parameters that live along the hidden axis, per hidden channel.

    ``fixed`` counts the parameters no layer kind owns that have a hidden axis (norms, output biases),
    divided by the width; ``per_unit[kind]`` the same for one unit of a kind (its owned slices with a
    hidden axis), and ``dependents[kind]`` for each dependent slice (0 where the slice has no hidden axis).
    """

    fixed: int
    per_unit: dict[str, int]
    dependents: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class HiddenDimension:
    """The model-level ``"hidden_channel"`` kind and what compaction and counting need to know of it.

    ``kind`` owns one index of every slice (paths from the model's root); ``norms`` are the module paths
    of the norms over the stream, in order; ``embedding`` the input embedding's weight path; ``head`` the
    LM head's weight path, ``None`` when it is tied to the embedding.
    """

    kind: StructureKind
    shares: tuple[LayerShare, ...]
    norms: tuple[str, ...]
    embedding: str
    head: str | None

    @property
    def width(self) -> int:
        return self.kind.count

    def params_kept(self, anatomy: ModelAnatomy, keep: KeepMask) -> int:
        """Decoder parameters left under ``keep``: every tensor with a hidden axis shrinks by ``H' / H``."""
        kept_width = int(keep[MODEL_LEVEL, HIDDEN_CHANNEL].sum())
        total = 0
        for layer, share in zip(anatomy.layers, self.shares, strict=True):
            if not keep.layer_kept(layer.index):
                continue
            total += layer.fixed_params - share.fixed * (self.width - kept_width)
            for name, kind in layer.kinds.items():
                flags = keep[layer.index, name]
                total += int(flags.sum()) * (kind.params_per_unit - share.per_unit[name] * (self.width - kept_width))
                for dep, per_channel in zip(kind.dependents, share.dependents[name], strict=True):
                    total += int(dep.alive(flags).sum()) * (dep.params_per_unit - per_channel * (self.width - kept_width))
        return total


def model_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter under ``module`` by its path, unmasked (masks attached or not), each tensor once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for path, sub in module.named_modules():
        if "parametrizations" in path.split("."):
            continue
        names = list(sub._parameters)
        if hasattr(sub, "parametrizations"):
            names += list(sub.parametrizations.keys())
        for name in names:
            tensor = dense_tensor(sub, name)
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                out[f"{path}.{name}" if path else name] = tensor
    return out


def _hidden_axis(path: str, shape: torch.Size, width: int, taken: set[int]) -> int | None:
    """The one axis of a tensor of ``shape`` that runs along the stream (``taken``: axes units cut)."""
    axes = [axis for axis in range(len(shape)) if shape[axis] == width and axis not in taken]
    if len(axes) > 1:
        raise ValueError(f"{path} {tuple(shape)} has several axes as wide as the hidden size {width}; declare its layout")
    return axes[0] if axes else None


def _cut_axes(layer: LayerAnatomy) -> dict[str, set[int]]:
    """The axes the layer kinds cut, by tensor path (a stacked tensor's expert dim 0 counts as cut)."""
    axes: dict[str, set[int]] = {}
    for kind in layer.kinds.values():
        for tensor_slice in list(kind.owned) + [dep.slice for dep in kind.dependents]:
            axes.setdefault(tensor_slice.path, set()).add(tensor_slice.axis)
            if tensor_slice.stacked:
                axes[tensor_slice.path].add(0)
    return axes


def _layer_slices(layer_module: nn.Module, layer: LayerAnatomy, width: int) -> tuple[list[TensorSlice], LayerShare]:
    """One layer's hidden slices (paths relative to the layer) and its parameters per hidden channel."""
    cut = _cut_axes(layer)
    tensors = model_tensors(layer_module)
    slices, axis_of = [], {}
    for path, tensor in tensors.items():
        axis = _hidden_axis(f"{layer.prefix}.{path}", tensor.shape, width, cut.get(path, set()))
        if axis is not None:
            slices.append(TensorSlice(path, axis, 1))
            axis_of[path] = axis
    fixed = sum(tensors[path].numel() // width for path in axis_of if path not in cut)

    def per_channel(tensor_slice: TensorSlice) -> int:
        if tensor_slice.path not in axis_of:
            return 0
        return tensor_slice.params_per_unit(tensors[tensor_slice.path].shape) // width

    per_unit = {name: sum(per_channel(s) for s in kind.owned) for name, kind in layer.kinds.items()}
    dependents = {name: tuple(per_channel(dep.slice) for dep in kind.dependents) for name, kind in layer.kinds.items()}
    return slices, LayerShare(fixed, per_unit, dependents)


def _layer_per_channel(layer: LayerAnatomy, share: LayerShare) -> int:
    """The parameters one hidden channel owns in a dense decoder layer."""
    total = share.fixed
    for name, kind in layer.kinds.items():
        total += kind.count * share.per_unit[name]
        total += sum(len(dep.readers) * per for dep, per in zip(kind.dependents, share.dependents[name], strict=True))
    return total


def _rooted(tensor_slice: TensorSlice, prefix: str) -> TensorSlice:
    return TensorSlice(f"{prefix}.{tensor_slice.path}", tensor_slice.axis, tensor_slice.width)


def hidden_dimension(model: nn.Module, layers: tuple[LayerAnatomy, ...]) -> HiddenDimension:
    """The hidden dimension of a decoder model whose layer kinds are ``layers``, read off its tensors."""
    embedding_module = model.get_input_embeddings()
    embedding = dense_tensor(embedding_module, "weight")
    width = embedding.shape[1]
    owned: list[TensorSlice] = []
    shares = []
    for layer in layers:
        slices, share = _layer_slices(model.get_submodule(layer.prefix), layer, width)
        owned += [_rooted(s, layer.prefix) for s in slices]
        shares.append(share)

    names = {id(tensor): path for path, tensor in model_tensors(model).items()}
    embedding_path = names[id(embedding)]
    head_module = model.get_output_embeddings()
    head = dense_tensor(head_module, "weight") if head_module is not None else None
    head_path = None if head is None or head is embedding else names[id(head)]
    inside = tuple(f"{layer.prefix}." for layer in layers)
    norms = []
    for path, tensor in model_tensors(model).items():
        if path.startswith(inside):
            continue
        if tensor is embedding:
            owned.append(TensorSlice(path, 1, 1))
        elif tensor is head:
            continue
        elif tensor.dim() == 1 and tensor.shape[0] == width:
            owned.append(TensorSlice(path, 0, 1))
        elif width in tensor.shape:
            raise ValueError(f"{path} {tuple(tensor.shape)} lies outside the decoder layers and is not a norm; cannot cut it")
    if head_path is not None:
        owned.append(TensorSlice(head_path, 1, 1))

    for tensor_slice in owned:
        tensor = dense_tensor(model.get_submodule(tensor_slice.module_path), tensor_slice.tensor_name)
        module = model.get_submodule(tensor_slice.module_path)
        if tensor.dim() == 1 and not any(p.dim() > 1 for p in module.parameters(recurse=False)):
            norms.append(tensor_slice.module_path)
    per_channel = sum(_layer_per_channel(layer, share) for layer, share in zip(layers, shares, strict=True))
    kind = StructureKind(HIDDEN_CHANNEL, HIDDEN_BLOCK, width, tuple(owned), per_channel)
    return HiddenDimension(kind, tuple(shares), tuple(dict.fromkeys(norms)), embedding_path, head_path)
