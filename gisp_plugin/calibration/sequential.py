"""Sequential calibration: walk the decoder layers one at a time, holding one layer's inputs.

This is how the activation-based references (Wanda-sp, FLAP) run, and what keeps memory flat on big
models: the calibration set is pushed through the embeddings once, the inputs of layer 0 are kept
(with the keyword arguments each layer receives: attention masks, rotary position embeddings), and
then each layer in turn

1. runs on the held inputs with hooks that accumulate statistics of the chosen modules' inputs,
2. is handed to the caller (the loop body may decide layer ``i``'s pruning and mask it),
3. turns the held inputs, in place, into its outputs: the inputs of layer ``i + 1``.

``propagate="pruned"`` recomputes step 3 after the caller's decision, so layer ``i + 1`` is calibrated
on the outputs of the already pruned layers before it (Wanda-sp); ``propagate="dense"`` keeps the
outputs of the statistics pass (FLAP, whose global decision needs every layer's statistics first).
Peak memory is one layer's activations for the whole calibration set plus one batch's intermediates,
whatever the depth of the model (``benchmarks/calibration_memory.py`` measures it). The weights can
be onloaded the same way, one layer at a time from CPU memory or disk (``placement``, see
``gisp_plugin.calibration.onloading``; ``benchmarks/onloading_memory.py`` measures it).

Data parallel (under ``torchrun``): each rank walks the layers on its contiguous share of the calibration
set, and a layer's statistics are merged over the ranks, in rank order, before they are handed to the
caller (``merged_over_ranks``): every rank sees the statistics of the whole set and takes the same decision,
so the masks a caller applies between layers (Wanda-sp) are the same on every rank.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from gisp_plugin.calibration.onloading import LayerPlacement
from gisp_plugin.calibration.recorder import InputStatsRecorder, batch_size_for
from gisp_plugin.calibration.statistics import ChannelStats, InputGram
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.context import current_setup
from gisp_plugin.distributed.data_parallel import merged_over_ranks, rank_share

log = logging.getLogger(__name__)

Propagation = Literal["pruned", "dense"]
# Keyword arguments a decoder layer receives that do not describe the calibration data.
_DROPPED_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache")


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


class _StopForward(Exception):
    """Raised by the capture stand-in of the last layer: nothing after the decoder layers is needed."""


@dataclass
class LayerInputs:
    """What every decoder layer needs for each calibration batch.

    ``hidden[b]`` holds the current layer's input hidden states of batch ``b`` (``[batch, seq, hidden]``);
    ``kwargs[i][b]`` the keyword arguments layer ``i`` receives for batch ``b`` (the tensors are shared
    between layers, not copied); ``token_masks[b]`` flags real (non-padding) tokens.
    """

    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]
    token_masks: list[torch.Tensor]

    def nbytes(self) -> int:
        """Bytes held in distinct tensors (hidden states, masks, position embeddings)."""
        seen: dict[int, int] = {}

        def visit(value: Any) -> None:
            if isinstance(value, torch.Tensor):
                seen[id(value)] = value.numel() * value.element_size()
            elif isinstance(value, (tuple, list)):
                for item in value:
                    visit(item)
            elif isinstance(value, dict):
                for item in value.values():
                    visit(item)

        visit(self.hidden)
        visit(self.kwargs)
        visit(self.token_masks)
        return sum(seen.values())


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    calibration: CalibrationSet,
    batch_size: int = 8,
    pad_token_id: int = 0,
    device: torch.device | None = None,
) -> LayerInputs:
    """Run the calibration set up to the first decoder layer and keep what each layer receives.

    Every layer's ``forward`` is briefly replaced by a stand-in that records its keyword arguments
    and passes the hidden states through untouched, so per-layer differences (a sliding-window mask on
    some layers only) are captured without computing any layer; the last stand-in stops the forward.
    """
    device = device or next(model.parameters()).device
    kwargs: list[list[dict[str, Any]]] = [[] for _ in layers]
    hidden: list[torch.Tensor] = []
    token_masks: list[torch.Tensor] = []

    def stand_in(index: int):
        def forward(hidden_states: torch.Tensor, *args: Any, **layer_kwargs: Any) -> torch.Tensor:
            if args:
                raise TypeError(f"decoder layer {index} got positional arguments the capture cannot route: {len(args)}")
            if index == 0:
                hidden.append(hidden_states.detach())
            kwargs[index].append({k: v for k, v in layer_kwargs.items() if k not in _DROPPED_KWARGS})
            if index == len(layers) - 1:
                raise _StopForward
            return hidden_states

        return forward

    for index, layer in enumerate(layers):
        layer.forward = stand_in(index)
    try:
        for batch in calibration.batches(batch_size_for(calibration, batch_size), pad_token_id):
            batch = batch.to(device)
            token_masks.append(batch.attention_mask.bool())
            with contextlib.suppress(_StopForward):
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for layer in layers:
            del layer.forward  # the class's forward is visible again
    if len(hidden) != len(token_masks) or any(len(k) != len(hidden) for k in kwargs):
        raise RuntimeError("the model did not call every decoder layer once per batch; sequential calibration needs that")
    return LayerInputs(hidden, kwargs, token_masks)


@dataclass
class LayerStatistics:
    """The statistics of one decoder layer's hooked modules, handed to the caller before propagation.

    ``stats`` is keyed by module path relative to the layer (``"mlp.down_proj"``); ``grams`` holds the input
    Gram matrices of the paths the walk was asked for (``gram_paths``).
    """

    index: int
    layer: nn.Module
    stats: dict[str, ChannelStats] = field(default_factory=dict)
    grams: dict[str, InputGram] = field(default_factory=dict)


def _output_hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class SequentialCalibration:
    """Iterate over decoder layers, yielding each layer's input statistics; see the module docstring.

    ``module_paths`` are relative to a decoder layer (``("self_attn.o_proj", "mlp.down_proj")``);
    those also in ``routed_paths`` are stacked routed experts, those in ``gram_paths`` also accumulate their
    input's Gram matrix (see ``InputStatsRecorder``). With a
    ``placement`` (``gisp_plugin.calibration.onloading``) the layers wait on CPU or disk and each is
    brought to the execution device for its turn only; the results are those of the in-memory walk.
    After iteration, ``peak_bytes`` is the largest number of activation bytes held at once (the
    calibration set's hidden states for one layer, the per-layer keyword arguments, one batch's output).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: nn.ModuleList,
        calibration: CalibrationSet,
        module_paths: Sequence[str],
        batch_size: int = 8,
        pad_token_id: int = 0,
        propagate: Propagation = "pruned",
        progress: bool = True,
        routed_paths: Sequence[str] = (),
        placement: LayerPlacement | None = None,
        gram_paths: Sequence[str] = (),
    ):
        if propagate not in ("pruned", "dense"):
            raise ValueError(f"propagate must be 'pruned' or 'dense', got {propagate!r}")
        self.model = model
        self.layers = layers
        self.calibration = calibration
        self.module_paths = tuple(module_paths)
        self.routed_paths = tuple(routed_paths)
        self.gram_paths = tuple(gram_paths)
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.propagate = propagate
        self.progress = progress
        self.placement = placement
        self.peak_bytes = 0

    def _run_layer(self, inputs: LayerInputs, index: int, replace: bool, recorder: InputStatsRecorder | None) -> None:
        layer = self.layers[index]
        for b, hidden in enumerate(inputs.hidden):
            if recorder is not None:
                recorder.token_mask = inputs.token_masks[b]
            output = _output_hidden(layer(hidden, **inputs.kwargs[index][b]))
            self.peak_bytes = max(self.peak_bytes, self._held + output.numel() * output.element_size())
            if replace:
                inputs.hidden[b] = output
            del output

    def __iter__(self) -> Iterator[LayerStatistics]:
        placement = self.placement
        with placement.walking() if placement is not None else contextlib.nullcontext():
            yield from self._walk(placement.device if placement is not None else None)

    def _walk(self, device: torch.device | None) -> Iterator[LayerStatistics]:
        setup = current_setup()
        share, _ = rank_share(self.calibration, setup=setup)
        with torch.no_grad():
            inputs = capture_layer_inputs(self.model, self.layers, share, self.batch_size, self.pad_token_id, device)
        self._held = inputs.nbytes()
        self.peak_bytes = max(self.peak_bytes, self._held)
        log.debug("sequential calibration holds %.1f MB of layer inputs", self._held / 2**20)
        for index in tqdm(range(len(self.layers)), desc="calibrating layers", disable=not (self.progress and setup.is_main)):
            layer = self.placement.onload(index) if self.placement is not None else self.layers[index]
            # a model may mix dense and mixture-of-experts layers: each layer records the paths it has
            modules = {path: layer.get_submodule(path) for path in self.module_paths if _has_submodule(layer, path)}
            with torch.no_grad(), InputStatsRecorder(modules, self.routed_paths, self.gram_paths) as recorder:
                self._run_layer(inputs, index, replace=self.propagate == "dense", recorder=recorder)
            device = inputs.hidden[0].device
            stats = merged_over_ranks(recorder.stats, device, setup)
            grams = merged_over_ranks(recorder.grams, device, setup) if self.gram_paths else {}
            yield LayerStatistics(index, layer, stats, grams)
            if self.propagate == "pruned" and index < len(self.layers) - 1:
                with torch.no_grad():
                    self._run_layer(inputs, index, replace=True, recorder=None)
            inputs.kwargs[index] = []  # layer i's arguments are no longer needed
            if self.placement is not None:
                self.placement.offload(index)
        inputs.hidden.clear()
