"""Built-in export formats, registered through the plugin manager like any other plugin's."""

from __future__ import annotations

from gisp_plugin.export.api import ExportFormat
from gisp_plugin.export.gguf_deci import GGUF
from gisp_plugin.export.hf_native import HF
from gisp_plugin.export.nemotron_nas import NEMOTRON_NAS
from gisp_plugin.plugins import hookimpl


@hookimpl
def gisp_export_formats() -> list[ExportFormat]:
    return [GGUF, NEMOTRON_NAS, HF]
