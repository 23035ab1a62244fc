"""The comparison's size table: every model with its parameters, size on disk, bytes per parameter and
headline quality, so "GISP 30% + int8wo" sits beside "dense + int8wo" and a user picks by quality per byte."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gisp_plugin.harness.uncertainty import metric_text

if TYPE_CHECKING:
    from gisp_plugin.harness.runner import Row

SIZE_METRICS = ("size_mib", "bytes_per_param")


def size_section(rows: list[Row], headline: list[str]) -> list[str]:
    """Markdown lines of the size table (empty when no row carries a size), rows sorted by size."""
    sized = [r for r in rows if "size_mib" in r.metrics]
    if not sized:
        return []
    lines = [
        "## Size and quality",
        "",
        "Size = bytes of the weight tensors as saved in safetensors (embeddings and LM head included, never quantised); "
        "bytes/param divides it by all parameters.",
        "",
        f"| model | sparsity | size (MiB) | bytes/param | {' | '.join(headline)} |",
        "|---|---|---|---|" + "---|" * len(headline),
    ]
    for r in sorted(sized, key=lambda r: -r.metrics["size_mib"]):
        cells = " | ".join(metric_text(r.metrics, metric) for metric in headline)
        lines.append(
            f"| {r.method} | {r.target:.0%} | {_mib(r.metrics['size_mib'])} | {r.metrics['bytes_per_param']:.2f} | {cells} |"
        )
    return [*lines, ""]


def _mib(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"
