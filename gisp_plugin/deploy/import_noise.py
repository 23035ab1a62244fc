"""Silence the warnings torchao's import logs on machines without CUDA.

Once torchao is installed, transformers imports it with its modelling code (every model load), and torchao
then logs that its CUDA-only extension libraries fail to load on a CPU machine, while torch notes a
deprecation in how torchao registers its enums. Neither matters to the CPU quantisation choices. This module
imports nothing heavy, so the command line can quiet those loggers before transformers is imported.
"""

from __future__ import annotations

import logging

IMPORT_NOISE = ("torchao", "torch.utils._pytree")


def quiet_torchao_import(quiet: bool = True) -> None:
    """Show only errors from torchao's import (``quiet=False`` restores the default levels)."""
    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.NOTSET)
