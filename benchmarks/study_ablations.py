"""GISP ablations on the real SmolLM2-135M: block normalisation, number of steps, calibration size.

- ``normalize``: ``reference`` / ``param_mean`` / ``block_mean`` / ``none``. Beside the quality numbers,
  the share of the pruned parameters that came from attention heads vs MLP channels, and a per-layer
  plot: without normalisation raw ``|W*g|`` sums grow with the weights a unit owns (a SmolLM2 query head
  owns 73,728 weights, an MLP channel 1,728), so the global ranking is lopsided between the blocks.
- ``steps``: gradient recomputations along the schedule (``1`` is one-shot), with GISP's wall time.
- ``n_samples``: calibration windows of ``seqlen`` tokens (each size is its own results folder).

Every run is a variant of the quality study's configuration run through the comparison harness
(``study_runs``): the variant equal to the quality study's own GISP run comes from its cache.

    python benchmarks/study_ablations.py --help
    python benchmarks/study_ablations.py --out results/study --json results/study/ablations.json
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from study_runs import (
    Variant,
    VariantResult,
    add_common_arguments,
    add_drop_tasks_argument,
    dropped,
    fmt,
    load_base,
    metric_table,
    ppl_metric,
    pruned_by_block,
    publish,
    row_summary,
    run_variant,
    sparsity_table,
)

from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy
from gisp_plugin.harness.config import ComparisonConfig
from gisp_plugin.harness.report import plot_metric

ABLATIONS = ("normalize", "steps", "n_samples")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, "ablations.json")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help=f"which ablations (default {','.join(ABLATIONS)})")
    p.add_argument("--normalize", default="reference,param_mean,block_mean,none", help="normalisation modes")
    p.add_argument("--steps", default="1,4,8,16", help="GISP step counts (default 1,4,8,16)")
    p.add_argument("--n-samples", default="8,32,128", help="calibration windows (default 8,32,128)")
    p.add_argument("--eval", dest="evals", action="append", help="evaluation spec replacing the base config's (repeatable)")
    add_drop_tasks_argument(p)
    return p.parse_args(argv)


def per_layer_removed(anatomy: ModelAnatomy, keep: KeepMask) -> dict[str, list[float]]:
    """Per block type, the fraction of each layer's parameters of that block that is pruned."""
    out: dict[str, list[float]] = {}
    for layer in anatomy.layers:
        for name, kind in layer.kinds.items():
            out.setdefault(kind.block, []).append(1 - kind.params_kept(keep[layer.index, name]) / kind.dense_params)
    return out


def plot_layers(per_mode: dict[str, dict[str, list[float]]], target: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(per_mode)
    fig, axes = plt.subplots(len(modes), 1, figsize=(7, 1.6 * len(modes) + 0.6), sharex=True, squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        for block, values in per_mode[mode].items():
            ax.plot(range(len(values)), values, marker=".", label=block)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("removed")
        ax.set_title(f"normalize={mode}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle(f"GISP at {target:.0%}: fraction of each layer's attention / MLP parameters removed", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def quality_tables(results: list[VariantResult], title: str, report: list[str]) -> None:
    rows = [r for v in results for r in v.rows]
    dense = results[0].dense
    ppl = ppl_metric(rows)
    report += [f"## {title}", ""]
    if ppl:
        report += [f"### {ppl}", "", *metric_table(rows, dense, ppl), ""]
    if any("mean_acc" in r.metrics for r in rows):
        report += ["### mean_acc (± standard error)", "", *metric_table(rows, dense, "mean_acc", 4, with_se=True), ""]
    report += ["### achieved sparsity", "", *sparsity_table(rows), ""]


def cost_table(results: list[VariantResult], report: list[str]) -> list[dict]:
    report += ["| variant | GISP wall time (s) | per subnetwork (s) | calibration tokens |", "|---|---|---|---|"]
    out = []
    for v in results:
        cost = v.result.costs[0]
        tokens = v.result.config.n_samples * v.result.config.seqlen
        out.append(
            {
                "label": v.variant.label,
                "prune_time_s": cost.prune_time_s,
                "time_per_subnetwork_s": cost.time_per_subnetwork_s,
                "tokens": tokens,
            }
        )
        report.append(f"| {v.variant.label} | {cost.prune_time_s:.0f} | {cost.time_per_subnetwork_s:.0f} | {tokens} |")
    report.append("")
    return out


def summarize(results: list[VariantResult]) -> list[dict]:
    return [{"label": v.variant.label, "folder": str(v.folder), "rows": [row_summary(r) for r in v.rows]} for v in results]


def ablation_normalize(base: ComparisonConfig, args, report: list[str], plots: Path) -> dict:
    modes = [m.strip() for m in args.normalize.split(",") if m.strip()]
    results = [
        run_variant(base, Variant(f"normalize={m}", "gisp", {"normalize": m}), args.out, True, dropped(args)) for m in modes
    ]
    quality_tables(results, "Ablation: block-wise normalisation", report)
    report += [
        "### Where the pruned parameters come from",
        "",
        "| variant | target | attention share of pruned | attention removed | MLP removed |",
        "|---|---|---|---|---|",
    ]
    blocks: dict = {}
    for v in results:
        for s in v.subnetworks:
            b = pruned_by_block(v.anatomy, s.keep)
            blocks[f"{v.variant.label}@{s.target:.2f}"] = b
            report.append(
                f"| {v.variant.label} | {s.target:.0%} | {b['attention']['share_of_pruned']:.3f} | "
                f"{b['attention']['removed']:.3f} | {b['mlp']['removed']:.3f} |"
            )
    dense = pruned_by_block(results[0].anatomy, results[0].subnetworks[0].keep)
    attention_share = dense["attention"]["dense"] / sum(b["dense"] for b in dense.values())
    report += ["", f"Attention holds {attention_share:.3f} of the prunable parameters of the dense model.", ""]
    top = max(s.target for s in results[0].subnetworks)
    per_mode = {v.variant.label.removeprefix("normalize="): per_layer_removed(v.anatomy, v.subnetworks[-1].keep) for v in results}
    plot_layers(per_mode, top, plots / "ablation_normalize_layers.png")
    ppl = ppl_metric([r for v in results for r in v.rows])
    if ppl:
        plot_metric(
            [r for v in results for r in v.rows],
            results[0].dense,
            ppl,
            plots / "ablation_normalize_ppl.png",
            "GISP block normalisation",
        )
    return {
        "variants": summarize(results),
        "blocks": blocks,
        "per_layer_at_top": per_mode,
        "dense_attention_share": attention_share,
    }


def gisp_sweep(base: ComparisonConfig, args, variants: list[Variant], title: str, plot: Path, report: list[str]) -> dict:
    """GISP variants side by side: quality tables, wall time per variant, and a perplexity plot."""
    results = [run_variant(base, v, args.out, drop=dropped(args)) for v in variants]
    quality_tables(results, title, report)
    costs = cost_table(results, report)
    rows = [r for v in results for r in v.rows]
    if ppl := ppl_metric(rows):
        plot_metric(rows, results[0].dense, ppl, plot, title)
    return {"variants": summarize(results), "costs": costs}


def ablation_steps(base: ComparisonConfig, args, report: list[str], plots: Path) -> dict:
    variants = [Variant(f"steps={s}", "gisp", {"steps": str(int(s))}) for s in args.steps.split(",") if s.strip()]
    return gisp_sweep(base, args, variants, "Ablation: number of GISP steps", plots / "ablation_steps_ppl.png", report)


def ablation_n_samples(base: ComparisonConfig, args, report: list[str], plots: Path) -> dict:
    sizes = [int(n) for n in args.n_samples.split(",") if n.strip()]
    variants = [Variant(f"n_samples={n}", "gisp", {}, {"n_samples": n}) for n in sizes]
    title = f"Ablation: calibration size ({base.calibration} windows of {base.seqlen} tokens)"
    return gisp_sweep(base, args, variants, title, plots / "ablation_n_samples_ppl.png", report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.config)
    if args.evals:
        base = ComparisonConfig.from_mapping({**base.to_json(), "evals": args.evals}, "--eval")
    chosen = [a.strip() for a in args.ablations.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown ablation {unknown[0]!r}; choose from {', '.join(ABLATIONS)}")
    plots = args.plots or args.out / "plots"
    started = time.perf_counter()
    report = [
        f"# GISP ablations on {base.model}",
        "",
        f"Base: GISP options {base.method_options.get('gisp', {})}, calibration {base.calibration} {base.n_samples} x "
        f"{base.seqlen}; evaluations: {', '.join(base.evals)}.",
        "",
    ]
    runners = {"normalize": ablation_normalize, "steps": ablation_steps, "n_samples": ablation_n_samples}
    results: dict = {"base": base.to_json()}
    for name in chosen:
        results[name] = runners[name](base, args, report, plots)
    results["wall_s"] = time.perf_counter() - started
    publish(report, results, args.json or args.out / "ablations.json", f"; plots in {plots}; {fmt(results['wall_s'], 0)} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
