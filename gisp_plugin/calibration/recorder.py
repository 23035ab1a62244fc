"""Forward hooks that accumulate ``ChannelStats`` of chosen modules' inputs, skipping padding tokens.

``InputStatsRecorder`` hooks any set of modules (``{"model.layers.3.mlp.down_proj": module}``); the
code that drives the forward passes tells it which tokens are real through ``token_mask``. The
one-pass helper ``collect_input_statistics`` runs the whole model over a calibration set; the
sequential engine (``gisp_plugin.calibration.sequential``) uses the same recorder one layer at a time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gisp_plugin.calibration.statistics import ChannelStats
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.finite import NonFiniteError


class InputStatsRecorder:
    """Per-channel statistics of the first positional input of each hooked module.

    Set ``token_mask`` (bool ``[batch, seq]``, True for real tokens) before each forward pass that
    carries padding; ``None`` counts every token. Use as a context manager, or call ``remove``.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.stats: dict[str, ChannelStats] = {}
        self.token_mask: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = [
            module.register_forward_pre_hook(self._hook(name)) for name, module in modules.items()
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            sequences = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.unsqueeze(0)  # [seqs, tokens, ch]
            mask = None
            if self.token_mask is not None:
                mask = self.token_mask.to(x.device)
                if mask.numel() != sequences.shape[0] * sequences.shape[1]:
                    raise ValueError(
                        f"token mask of {mask.numel()} tokens does not fit an input of {sequences.shape[0] * sequences.shape[1]}"
                    )
                mask = mask.reshape(sequences.shape[:2])
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(
                    f"the input of {name} holds inf or NaN on the calibration data; check the model's weights, or use float32"
                )
            if name not in self.stats:
                self.stats[name] = ChannelStats(sequences.shape[-1], device=x.device)
            self.stats[name].update_sequences(sequences, None if mask is None or bool(mask.all()) else mask)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> InputStatsRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def batch_size_for(calibration: CalibrationSet, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return min(batch_size, len(calibration))


@torch.no_grad()
def collect_input_statistics(
    model: nn.Module,
    calibration: CalibrationSet,
    module_paths: list[str],
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> dict[str, ChannelStats]:
    """Input statistics of ``module_paths`` over the calibration set, from full forward passes.

    Every layer sees the outputs of the model as it is now (dense, or masked if masks are applied).
    This holds nothing but the statistics between batches; it is the simple reference the
    sequential engine must agree with when it propagates dense outputs.
    """
    device = next(model.parameters()).device
    modules = {path: model.get_submodule(path) for path in module_paths}
    with InputStatsRecorder(modules) as recorder:
        for batch in calibration.batches(batch_size_for(calibration, batch_size), pad_token_id):
            batch = batch.to(device)
            recorder.token_mask = batch.attention_mask.bool()
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return recorder.stats
