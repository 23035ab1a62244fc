"""What an export format is, and what an export reports.

A format is a declaration found through the plugin manager (hook ``gisp_export_formats``), like a method
or an adapter: a name, what it is for, whether it writes one file or a folder, a ``check`` that refuses a
model the format cannot express (one line, before anything is written) and a ``write`` that writes it.
Every export reports in one line what it keeps exact and what its padding costs: the decoder parameters
the engine executes beside those of the compacted model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from gisp_plugin.export.engine_layers import GROUPINGS

__all__ = ["GROUPINGS", "WEIGHT_TYPES", "ExportError", "ExportFormat", "ExportOptions", "ExportReport"]

WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0")


class ExportError(ValueError):
    """A model, folder or option that an export format cannot take, with what to do instead."""


@dataclass(frozen=True)
class ExportOptions:
    """Choices of one export: tensor type (GGUF), how uneven key/value groups are made even, a pre-tokenizer name."""

    weight_type: str = "f32"
    grouping: str = "auto"
    tokenizer_pre: str | None = None

    def __post_init__(self) -> None:
        if self.weight_type not in WEIGHT_TYPES:
            raise ExportError(f"unknown weight type {self.weight_type!r}; choose one of {', '.join(WEIGHT_TYPES)}")
        if self.grouping not in GROUPINGS:
            raise ExportError(f"unknown grouping {self.grouping!r}; choose one of {', '.join(GROUPINGS)}")


@dataclass
class ExportReport:
    """What an export wrote and what it costs: decoder parameters executed vs the compacted model's."""

    format: str
    path: Path
    exact: str
    executed_params: int
    compacted_params: int
    padding: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def overhead(self) -> float:
        """Executed over compacted decoder parameters (1.0: the engine runs exactly the pruned model's size)."""
        return self.executed_params / self.compacted_params if self.compacted_params else 1.0

    def line(self) -> str:
        padded = "; padded: " + ", ".join(self.padding) if self.padding else "; no padding"
        return (
            f"{self.format} -> {self.path}: {self.exact}; executes {self.executed_params:,} decoder parameters, "
            f"{self.overhead:.3f}x the compacted model's {self.compacted_params:,}{padded}"
        )

    def record(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "path": str(self.path),
            "exact": self.exact,
            "executed_params": self.executed_params,
            "compacted_params": self.compacted_params,
            "padding": self.padding,
            **self.details,
        }


@dataclass(frozen=True)
class ExportFormat:
    """One engine format: ``check(model, options)`` raises ``ExportError`` for what it cannot express;
    ``write(model, tokenizer_folder, out, options)`` writes ``out`` (a file when ``single_file``) and reports."""

    name: str
    description: str
    single_file: bool
    check: Callable[[PreTrainedModel, ExportOptions], None]
    write: Callable[[PreTrainedModel, Path, Path, ExportOptions], ExportReport]
