"""Hook specifications: every kind of thing a plugin can add to gisp-plugin.

Each hook returns a list, so one plugin may contribute several items; names must be unique across
all plugins. Built-in methods, adapters, data sources, losses and evaluators use these same hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from gisp_plugin.adapters.api import ArchitectureAdapter
    from gisp_plugin.data.api import DataSource
    from gisp_plugin.evaluation.api import Evaluator
    from gisp_plugin.export.api import ExportFormat
    from gisp_plugin.importance.losses import Loss
    from gisp_plugin.methods.api import MethodSpec

PROJECT = "gisp_plugin"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def gisp_methods() -> list[MethodSpec]:
    """Pruning methods this plugin provides."""


@hookspec
def gisp_adapters() -> list[ArchitectureAdapter]:
    """Architecture adapters mapping a Hugging Face model family onto prunable structures."""


@hookspec
def gisp_data_sources() -> list[DataSource]:
    """Named calibration and evaluation data sources."""


@hookspec
def gisp_losses() -> list[Loss]:
    """Calibration objectives whose gradients score structures (next-token, margin, ...)."""


@hookspec
def gisp_evaluators() -> list[Evaluator]:
    """Named evaluators that measure a (pruned) model."""


@hookspec
def gisp_export_formats() -> list[ExportFormat]:
    """Formats a pruned model can be exported to for an inference engine (GGUF, Nemotron-NAS, ...)."""
