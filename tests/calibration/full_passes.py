"""The reference the sequential engine is tested against: input statistics from plain full-model passes.

Every layer sees the outputs of the model as it is now (dense, or masked if masks are applied); nothing
but the statistics is held between batches. No method uses it (they calibrate layer by layer), so it
lives with the tests as their oracle.
"""

from __future__ import annotations

import torch
from torch import nn

from gisp_plugin.calibration.recorder import InputStatsRecorder, batch_size_for
from gisp_plugin.calibration.statistics import ChannelStats
from gisp_plugin.data.api import CalibrationSet


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
