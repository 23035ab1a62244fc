"""Shared pieces of the head-to-head study scripts (``study_claims``, ``study_ablations``, ``study_cost``).

The study is built on the comparison harness: the quality table is ``gisp compare --config
benchmarks/configs/quality.yaml --out results/study/quality``, and every other run is a *variant* of
that configuration (one method with other options, another calibration source or size) run through
``gisp_plugin.harness.runner.Comparison``. A variant whose calibration matches the quality study runs
in the quality study's folder, so it shares its cache (the dense model's evaluation, and any identical
pruning run, are never redone); a variant with other calibration data gets a folder of its own, named
by what differs. Rows come back labelled with the variant's name.

Statistics: the standard error of a mean accuracy over tasks is ``sqrt(sum se_task^2) / n_tasks``
(tasks independent); of a difference between two models, ``sqrt(se_1^2 + se_2^2)`` (conservative:
both models see the same examples, so the paired error is smaller).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy
from gisp_plugin.harness.config import ComparisonConfig
from gisp_plugin.harness.runner import Comparison, ComparisonResult, Row
from gisp_plugin.methods.api import Subnetwork

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
QUALITY_CONFIG = HERE / "configs" / "quality.yaml"
DEFAULT_ROOT = Path("results/study")
QUALITY_FOLDER = "quality"


@dataclass(frozen=True)
class Variant:
    """One labelled run: ``method`` with ``options`` (merged over the base config's options for it),
    and ``config`` overrides of the base ComparisonConfig (``calibration``, ``n_samples``, ...)."""

    label: str
    method: str
    options: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class VariantResult:
    variant: Variant
    folder: Path
    dense: Row
    rows: list[Row]  # relabelled with the variant's label
    result: ComparisonResult
    subnetworks: list[Subnetwork] | None = None  # the pruning decisions, when asked for
    anatomy: ModelAnatomy | None = None


def load_base(path: Path | None) -> ComparisonConfig:
    """The quality study's configuration (or another file, e.g. a tiny one for a smoke test)."""
    return ComparisonConfig.from_file(path or QUALITY_CONFIG)


def variant_config(base: ComparisonConfig, variant: Variant) -> ComparisonConfig:
    options = {**base.method_options.get(variant.method, {}), **variant.options}
    data = {**base.to_json(), "methods": [variant.method], "method_options": {variant.method: options}, **variant.config}
    return ComparisonConfig.from_mapping(data, f"variant {variant.label!r}")


def results_folder(root: Path, base: ComparisonConfig, config: ComparisonConfig) -> Path:
    """The quality folder when the identity (model, dtype, seed, calibration) matches, else one named by the difference."""
    ours, theirs = config.identity(), base.identity()
    if ours == theirs:
        return root / QUALITY_FOLDER
    diff = "-".join(f"{key}={ours[key]}" for key in sorted(ours) if ours[key] != theirs[key])
    return root / ("runs-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", diff))


def without_tasks(row: Row, drop: frozenset[str], label: str | None = None) -> Row:
    """``row`` (relabelled) with ``mean_acc`` and its task details restricted to the tasks not in ``drop``.

    For tasks whose accuracy measures which answer a model prefers rather than what it knows: on the 50
    BoolQ questions evaluated, SmolLM2 scores 0.26 and its pruned models 0.24-0.74, what answering always
    "no" or always "yes" scores there; such a flip swings a seven-task mean by 0.07.
    """
    details = {}
    for spec, info in row.details.items():
        if isinstance(info, dict) and info.get("evaluator") == "lm_eval" and drop:
            info = {**info, "tasks": {t: v for t, v in info["tasks"].items() if t not in drop}, "dropped": sorted(drop)}
        details[spec] = info
    metrics = dict(row.metrics)
    used = [
        info[info["mean_uses"]]
        for d in details.values()
        if isinstance(d, dict) and d.get("evaluator") == "lm_eval"
        for info in d["tasks"].values()
        if info.get("mean_uses")
    ]
    if drop and "mean_acc" in metrics and used:
        metrics["mean_acc"] = sum(used) / len(used)
        metrics.pop("mean_acc_stderr", None)  # the harness's value covers the dropped tasks too
    out = Row(label or row.method, row.target, row.sparsity, metrics, details)
    if drop and "mean_acc" in metrics and used and (se := mean_acc_stderr(out)) is not None:
        metrics["mean_acc_stderr"] = se
    return out


def run_variant(
    base: ComparisonConfig, variant: Variant, root: Path, subnetworks: bool = False, drop: frozenset[str] = frozenset()
) -> VariantResult:
    """Run (or read from the cache) one variant through the harness; ``subnetworks``: also return its keep
    masks; ``drop``: tasks left out of ``mean_acc`` (``without_tasks``)."""
    config = variant_config(base, variant)
    folder = results_folder(root, base, config)
    log.info("variant %s -> %s", variant.label, folder)
    comparison = Comparison(config, folder)
    result = comparison.run()
    dense = without_tasks(result.rows[0], drop)
    rows = [without_tasks(r, drop, variant.label) for r in result.rows[1:]]
    out = VariantResult(variant, folder, dense, rows, result)
    if subnetworks:
        out.subnetworks, _ = comparison.prune(variant.method)  # from the cache the run just filled
        out.anatomy = adapter_for(comparison.model).anatomy(comparison.model)
    return out


def run_base(base: ComparisonConfig, root: Path, drop: frozenset[str] = frozenset()) -> tuple[Row, list[Row]]:
    """The quality study's dense row and method rows (the same run ``gisp compare`` makes; cached after its first)."""
    rows = [without_tasks(r, drop) for r in Comparison(base, root / QUALITY_FOLDER).run().rows]
    return rows[0], rows[1:]


def add_drop_tasks_argument(parser) -> None:
    parser.add_argument(
        "--drop-tasks",
        default="boolq",
        help="tasks left out of mean_acc (default boolq: SmolLM2's BoolQ accuracy is its preference for 'yes' or 'no'); "
        "'' keeps all",
    )


def dropped(args) -> frozenset[str]:
    return frozenset(t.strip() for t in args.drop_tasks.split(",") if t.strip())


def pruned_by_block(anatomy: ModelAnatomy, keep: KeepMask) -> dict[str, dict[str, float]]:
    """Per block type: parameters pruned, dense parameters, and the block's share of all pruned parameters."""
    pruned: dict[str, int] = {}
    dense: dict[str, int] = {}
    for layer in anatomy.layers:
        for name, kind in layer.kinds.items():
            dense[kind.block] = dense.get(kind.block, 0) + kind.dense_params
            pruned[kind.block] = pruned.get(kind.block, 0) + kind.dense_params - kind.params_kept(keep[layer.index, name])
    total = sum(pruned.values()) or 1
    return {
        block: {
            "pruned": pruned[block],
            "dense": dense[block],
            "share_of_pruned": pruned[block] / total,
            "removed": pruned[block] / dense[block],
        }
        for block in dense
    }


def block_split(base: ComparisonConfig, root: Path, methods: list[str]) -> dict[str, dict[float, dict]]:
    """Per method of the quality study and target: ``pruned_by_block`` of its subnetwork (from the cache)."""
    comparison = Comparison(base, root / QUALITY_FOLDER)
    anatomy = adapter_for(comparison.model).anatomy(comparison.model)
    return {method: {s.target: pruned_by_block(anatomy, s.keep) for s in comparison.prune(method)[0]} for method in methods}


# --- reading metrics -------------------------------------------------------------------------------------


def ppl_metric(rows: list[Row]) -> str | None:
    names = sorted({name for row in rows for name in row.metrics if name.startswith("ppl[")})
    return names[0] if names else None


def mean_acc_stderr(row: Row) -> float | None:
    """Standard error of ``mean_acc``: per-task stderr of the metric the mean uses, combined."""
    tasks = {}
    for spec_details in row.details.values():
        if isinstance(spec_details, dict) and spec_details.get("evaluator") == "lm_eval":
            tasks.update(spec_details.get("tasks", {}))
    errors = []
    for task, info in tasks.items():
        used = info.get("mean_uses")
        if used is None:
            continue
        se = row.metrics.get(f"{used}_stderr[{task}]")
        if se is None:
            return None
        errors.append(se)
    return math.sqrt(sum(e * e for e in errors)) / len(errors) if errors else None


def row_summary(row: Row) -> dict[str, Any]:
    """The numbers a claim looks at: perplexity, mean accuracy and its standard error, achieved sparsity."""
    ppl = ppl_metric([row])
    return {
        "label": row.method,
        "target": row.target,
        "sparsity": row.sparsity,
        "ppl": row.metrics.get(ppl) if ppl else None,
        "mean_acc": row.metrics.get("mean_acc"),
        "mean_acc_se": mean_acc_stderr(row),
    }


def by_target(rows: list[Row], label: str) -> dict[float, Row]:
    return {round(r.target, 4): r for r in rows if r.method == label}


def diff_with_error(a: Row, b: Row) -> tuple[float | None, float | None]:
    """``mean_acc(a) - mean_acc(b)`` and its (conservative) standard error."""
    if "mean_acc" not in a.metrics or "mean_acc" not in b.metrics:
        return None, None
    se_a, se_b = mean_acc_stderr(a), mean_acc_stderr(b)
    se = math.sqrt(se_a**2 + se_b**2) if se_a is not None and se_b is not None else None
    return a.metrics["mean_acc"] - b.metrics["mean_acc"], se


# --- output ----------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.{digits}f}"


def metric_table(rows: list[Row], dense: Row | None, metric: str, digits: int = 2, with_se: bool = False) -> list[str]:
    """Markdown: one line per label, one column per target (dense first), like the harness's tables."""
    targets = sorted({r.target for r in rows})
    labels = list(dict.fromkeys(r.method for r in rows))
    lines = [f"| variant | dense | {' | '.join(f'{t:.0%}' for t in targets)} |", "|---|---|" + "---|" * len(targets)]

    def cell(row: Row | None) -> str:
        if row is None or metric not in row.metrics:
            return "-"
        text = fmt(row.metrics[metric], digits)
        if with_se and (se := mean_acc_stderr(row)) is not None:
            text += f" ± {se:.{digits}f}"
        return text

    for label in labels:
        found = by_target(rows, label)
        cells = [cell(found.get(round(t, 4))) for t in targets]
        lines.append(f"| {label} | {cell(dense)} | {' | '.join(cells)} |")
    return lines


def sparsity_table(rows: list[Row]) -> list[str]:
    targets = sorted({r.target for r in rows})
    labels = list(dict.fromkeys(r.method for r in rows))
    lines = [f"| variant | {' | '.join(f'{t:.0%}' for t in targets)} |", "|---|" + "---|" * len(targets)]
    for label in labels:
        found = by_target(rows, label)
        lines.append(
            f"| {label} | {' | '.join(fmt(found[round(t, 4)].sparsity, 4) if round(t, 4) in found else '-' for t in targets)} |"
        )
    return lines


def publish(report: list[str], results: dict[str, Any], json_path: Path, footer: str = "") -> None:
    """Print the markdown report and save it twice: inside the results JSON and as ``.md`` beside it."""
    text = "\n".join(report)
    print(text)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({**results, "markdown": text}, indent=1, default=str))
    json_path.with_suffix(".md").write_text(text)
    print(f"saved {json_path} and {json_path.with_suffix('.md')}{footer}")


def add_common_arguments(parser, default_json: str, plots: bool = True) -> None:
    """The options every study script shares: base config, study root, threads, JSON path (and plots)."""
    parser.add_argument(
        "--config", type=Path, default=None, help="base comparison file (default benchmarks/configs/quality.yaml)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="study root; the quality study lives in OUT/quality")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help=f"where to save the results (default OUT/{default_json})")
    if plots:
        parser.add_argument("--plots", type=Path, default=None, help="folder for the PNG plots (default OUT/plots)")
