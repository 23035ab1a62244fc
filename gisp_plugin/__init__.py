"""gisp-plugin: structured pruning of LLMs with methods picked by name, one loop, one harness.

The public entry points are loaded on first use, so plugins importing ``gisp_plugin.plugins`` stay light.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

try:
    __version__ = metadata.version("gisp-plugin")
except metadata.PackageNotFoundError:  # running from a source checkout that was never installed
    __version__ = "0+source"

_EXPORTS = {
    "load_model": "gisp_plugin.models.loading",
    "load_pruned": "gisp_plugin.checkpoint.saving",
    "save_pruned": "gisp_plugin.checkpoint.saving",
    "run_method": "gisp_plugin.pruning",
    "PruneRequest": "gisp_plugin.prune_request",
    "prune": "gisp_plugin.prune_job",
    "compact_subnetwork": "gisp_plugin.pruning",
    "Trajectory": "gisp_plugin.checkpoint.trajectory",
    "KeepMask": "gisp_plugin.anatomy.structures",
    "adapter_for": "gisp_plugin.adapters.api",
    "evaluate": "gisp_plugin.evaluation.specs",
    "run_comparison": "gisp_plugin.harness.runner",
    "ComparisonConfig": "gisp_plugin.harness.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gisp_plugin' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
