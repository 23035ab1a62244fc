"""The default MLP-width padding of compacted models: a multiple GPU kernels like on CUDA, none elsewhere.

Pruning leaves MLP widths such as 1531 that GPU matrix kernels run slowly (the H200 measurement in issue 13:
compacted models at 0.48x-0.75x dense prefill speed). Zero channels make the width a multiple of 64 and change
no output (a zero row of gate/up and a zero column of down contribute exactly nothing). On CPU the extra
channels cost time and bytes, so it stays unpadded unless asked.
"""

from __future__ import annotations

import torch

GPU_PAD_TO = 64


def default_pad_to(device: str | torch.device, pad_to: int | None = None) -> int:
    """``pad_to`` when given, else ``GPU_PAD_TO`` on CUDA and 1 (no padding) elsewhere."""
    if pad_to is not None:
        if pad_to < 1:
            raise ValueError(f"--pad-to {pad_to} must be 1 (no padding) or more")
        return pad_to
    return GPU_PAD_TO if torch.device(device).type == "cuda" else 1
