"""Comparison outputs: a paper-style Markdown table, CSV, JSON and PNG plots.

Headline tables put methods in rows and sparsities in columns, one table per headline metric
(perplexity per text source and context length, and mean zero-shot accuracy); per-task detail and the
cost of each method follow below them. Tables show each number with its standard error, rounded to the
digits the error supports (``harness.uncertainty``); CSV and JSON keep every digit and every stderr.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from gisp_plugin.harness.size_report import SIZE_METRICS, size_section
from gisp_plugin.harness.uncertainty import is_stderr, metric_text, stderr_name

if TYPE_CHECKING:
    from gisp_plugin.harness.runner import ComparisonResult, Row

HEADLINE_PREFIXES = ("ppl[", "mean_acc")


def _names(rows: list[Row]) -> set[str]:
    return {name for row in rows for name in row.metrics if not is_stderr(name)}


def headline_metrics(rows: list[Row]) -> list[str]:
    return sorted(n for n in _names(rows) if n.startswith(HEADLINE_PREFIXES))


def detail_metrics(rows: list[Row]) -> list[str]:
    return sorted(n for n in _names(rows) if not n.startswith(HEADLINE_PREFIXES) and n not in SIZE_METRICS)


def row_line(row: Row, seconds: float | None = None, cached: bool = False) -> str:
    """One finished row for the console: ``gisp @ 20% (achieved 0.2001): mean_acc 0.41 ± 0.05, ... (evaluated in 31 s)``."""
    where = "dense" if row.method == "dense" else f"{row.method} @ {row.target:.0%} (achieved {row.sparsity:.4f})"
    numbers = ", ".join(f"{name} {metric_text(row.metrics, name)}" for name in headline_metrics([row]))
    when = " (cached)" if cached else f" (evaluated in {seconds:.0f} s)" if seconds is not None else ""
    return f"{where}: {numbers or 'no headline metrics'}{when}"


def _method_order(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(row.method for row in rows if row.method != "dense"))


def _pivot(rows: list[Row], metric: str) -> list[str]:
    """Methods x sparsities for one metric, the dense value in its own column."""
    dense = next((r for r in rows if r.method == "dense"), None)
    targets = sorted({r.target for r in rows if r.target > 0})
    lines = [
        f"| method | dense | {' | '.join(f'{t:.0%}' for t in targets)} |",
        "|---|---|" + "---|" * len(targets),
    ]
    for method in _method_order(rows):
        by_target = {r.target: r for r in rows if r.method == method}
        cells = [metric_text(by_target[t].metrics, metric) if t in by_target else "-" for t in targets]
        own_dense = by_target.get(0.0, dense)  # a quantised dense row (dense+int8wo) fills its own dense cell
        lines.append(f"| {method} | {metric_text(own_dense.metrics, metric) if own_dense else '-'} | {' | '.join(cells)} |")
    return lines


def markdown(result: ComparisonResult) -> str:
    """The whole report: settings, headline tables, achieved sparsity, per-task detail, cost."""
    c = result.config
    rows = result.rows
    out = [
        f"# Comparison on {c.model}",
        "",
        f"Calibration: {c.calibration}, {c.n_samples} x {c.seqlen} tokens, seed {c.seed}; dtype {c.dtype}; "
        f"device {c.device}. Sparsity = 1 - decoder params left / dense decoder params (embeddings and LM head not counted).",
        "",
    ]
    for spec, details in result.eval_settings.items():
        out.append(f"- `{spec}`: " + _eval_note(details))
    out.append("")
    for metric in headline_metrics(rows):
        out += [f"## {metric}", "", *_pivot(rows, metric), "", resolution_line(rows, metric), ""]
    out += ["## Achieved sparsity", "", "| method | target | achieved |", "|---|---|---|"]
    out += [f"| {r.method} | {r.target:.2f} | {r.sparsity:.4f} |" for r in rows if r.target > 0]
    out.append("")
    out += size_section(rows, headline_metrics(rows))
    details = detail_metrics(rows)
    if details:
        out += ["## Per-task detail", "", f"| method | sparsity | {' | '.join(details)} |", "|---|---|" + "---|" * len(details)]
        for r in rows:
            out.append(f"| {r.method} | {r.target:.0%} | {' | '.join(metric_text(r.metrics, d) for d in details)} |")
        out.append("")
    out += ["## Cost of pruning", "", "| method | prune time (s) | time per subnetwork (s) | peak memory (MiB) | cached |"]
    out.append("|---|---|---|---|---|")
    for cost in result.costs:
        out.append(
            f"| {cost.method} | {cost.prune_time_s:.1f} | {cost.time_per_subnetwork_s:.1f} | "
            f"{cost.peak_memory_bytes / 2**20:.0f} | {'yes' if cost.cached else 'no'} |"
        )
    out.append("")
    return "\n".join(out)


def _eval_note(details: dict) -> str:
    if details.get("evaluator") == "perplexity":
        return f"perplexity on the evaluation part of {details.get('source')}, context length {details.get('seqlen')} tokens"
    if details.get("evaluator") == "lm_eval":
        offline = "offline copies (evaluation part of validation splits)" if details.get("offline") else "lm-eval datasets"
        return f"lm-eval, limit {details.get('limit')} per task, {offline}; mean accuracy: {details.get('mean_acc_rule')}"
    return json.dumps(details)[:200]


def write_csv(rows: list[Row], path: Path) -> None:
    """Every metric at full precision, each followed by its standard error where one was measured."""
    present = {name for row in rows for name in row.metrics}
    ordered = headline_metrics(rows) + detail_metrics(rows)
    metrics = [name for metric in ordered for name in (metric, stderr_name(metric)) if name in present]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "target", "sparsity", *metrics])
        for r in rows:
            writer.writerow([r.method, r.target, f"{r.sparsity:.6f}", *(r.metrics.get(m, "") for m in metrics)])


def _separated(metric: str, a: dict[str, float], b: dict[str, float]) -> bool | None:
    """Whether two rows differ in ``metric`` by more than 2 combined standard errors (None: an error is
    missing). Perplexity is compared on the log scale, where its error was measured (mean window NLL)."""
    va, vb = a.get(metric), b.get(metric)
    sa, sb = a.get(stderr_name(metric)), b.get(stderr_name(metric))
    if None in (va, vb, sa, sb) or not all(math.isfinite(x) for x in (va, vb, sa, sb)):
        return None
    if metric.startswith("ppl["):
        if va <= 0 or vb <= 0:
            return None
        return abs(math.log(va) - math.log(vb)) > 2 * math.hypot(sa / va, sb / vb)
    return abs(va - vb) > 2 * math.hypot(sa, sb)


def resolution_line(rows: list[Row], metric: str) -> str:
    """Which methods this run cannot tell apart in ``metric``: the pairs, at one target, whose difference is
    within 2 combined standard errors (sqrt(se_a^2 + se_b^2)); every other pair is separated."""
    close: list[str] = []
    for target in sorted({r.target for r in rows if r.target > 0}):
        at = [r for r in rows if r.target == target and r.method != "dense"]
        pairs = [
            f"{a.method}~{b.method}"
            for i, a in enumerate(at)
            for b in at[i + 1 :]
            if _separated(metric, a.metrics, b.metrics) is False
        ]
        if pairs:
            close.append(f"at {target:.0%}: {', '.join(pairs)}")
    if not close:
        return "Every pair of methods at one target differs by more than 2 standard errors."
    return (
        "Not separated (difference within 2 combined standard errors; read these as ties) "
        + "; ".join(close)
        + ". Every other pair at one target differs by more than 2 standard errors."
    )


def _floors(worst: dict[str, float]) -> set[str]:
    """Methods whose worst perplexity is more than 10x the median method's worst: drawn off-scale."""
    values = sorted(worst.values())
    if len(values) < 3:
        return set()
    half = len(values) // 2
    median = values[half] if len(values) % 2 else (values[half - 1] + values[half]) / 2
    return {m for m, v in worst.items() if v > 10 * median}


def plot_metric(rows: list[Row], dense: Row | None, metric: str, path: Path, title: str | None = None) -> Path:
    """``metric`` against achieved sparsity, one line per method (first-seen order) with its standard
    error as error bars, ``dense`` at 0.

    Perplexity is drawn on a log scale clipped to the methods that compete: a method whose worst value is
    more than 10x the median method's worst (a floor such as magnitude, at ~10^6) would squash the others
    into the bottom of the axis, so its points above the axis are listed at the top edge under an arrow.
    Methods are nudged apart along x by a fraction of a percent so that equal values stay visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    error = stderr_name(metric)
    series = {
        method: sorted(
            (r.sparsity, r.metrics[metric], r.metrics.get(error) or 0.0)
            for r in rows
            if r.method == method and metric in r.metrics
        )
        for method in _method_order(rows)
    }
    series = {method: points for method, points in series.items() if points}
    start = dense.metrics[metric] if dense is not None and metric in dense.metrics else None
    log_scale = metric.startswith("ppl[")
    floors = _floors({m: max(p[1] for p in pts) for m, pts in series.items()}) if log_scale else set()
    top = None
    if floors:
        top = 6 * max(v + e for m, pts in series.items() if m not in floors for _, v, e in pts)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if start is not None:
        ax.errorbar(
            [0.0],
            [start],
            yerr=[dense.metrics.get(error) or 0.0],
            color="black",
            marker="*",
            markersize=10,
            capsize=3,
            linestyle="none",
            label="dense",
            zorder=3,
        )
    markers = "osD^vP*Xhp<>"
    spread = 0.004
    off_scale: dict[float, list[str]] = {}
    for i, (method, points) in enumerate(series.items()):
        dx = (i - (len(series) - 1) / 2) * spread
        shown = [(x + dx, v, e) for x, v, e in points if top is None or v <= top]
        if start is not None:
            shown = [(0.0, start, 0.0), *shown]
        ax.errorbar(
            [p[0] for p in shown],
            [p[1] for p in shown],
            yerr=[p[2] for p in shown],
            marker=markers[i % len(markers)],
            capsize=3,
            label=f"{method} (off scale)" if method in floors else method,
            linestyle="--" if method in floors else "-",
        )
        for x, v, _ in points:
            if top is not None and v > top:
                off_scale.setdefault(round(x, 2), []).append(f"{method} {v:.3g}")
    for x, labels in off_scale.items():
        ax.annotate(
            "off scale:\n" + "\n".join(labels),
            xy=(x, top),
            xytext=(x, top / 1.6),
            ha="center",
            va="top",
            fontsize=7,
            arrowprops={"arrowstyle": "->", "color": "gray"},
        )
    ax.set_xlabel("sparsity (decoder parameters removed)")
    ax.set_ylabel(metric)
    if log_scale:
        ax.set_yscale("log")
    if top is not None:
        ax.set_ylim(top=top)
    if title:
        ax.set_title(title, fontsize=10)
    elif top is not None:
        ax.set_title("arrows: values above the axis; bars: 1 standard error", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(rows: list[Row], folder: Path) -> list[Path]:
    """One PNG per headline metric: the metric against sparsity, one line per method, dense at 0."""
    dense = next((r for r in rows if r.method == "dense"), None)
    paths = []
    for metric in headline_metrics(rows):
        safe = "".join(ch if ch.isalnum() else "_" for ch in metric).strip("_")
        paths.append(plot_metric(rows, dense, metric, folder / f"{safe}.png"))
    return paths


def write_outputs(result: ComparisonResult, folder: Path) -> dict[str, Path]:
    """Write table.md, results.csv, results.json and the plots into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "table.md"
    _write_atomic(table, markdown(result))
    csv_tmp = folder / ".results.csv.tmp"
    write_csv(result.rows, csv_tmp)
    csv_tmp.replace(folder / "results.csv")
    _write_atomic(
        folder / "results.json",
        json.dumps(
            {
                "config": result.config.to_json(),
                "eval_settings": result.eval_settings,
                "rows": [asdict(r) for r in result.rows],
                "costs": [asdict(c) for c in result.costs],
            },
            indent=1,
            default=str,
        ),
    )
    plots = write_plots(result.rows, folder)
    return {"table": table, "csv": folder / "results.csv", "json": folder / "results.json", **{p.stem: p for p in plots}}


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name and rename it: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
