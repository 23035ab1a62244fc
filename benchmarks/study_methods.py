"""The methods of issue 20 (SLEB, BlockPruner, SlimGPT, Minitron, GISP with hidden channels) against GISP.

Each is a variant of the quality study (``benchmarks/configs/quality.yaml``: SmolLM2-135M, 32 x 128 tokens
of LAMBADA novels, 20-50%), so it runs in the quality folder and shares its cache: after ``gisp compare
--config benchmarks/configs/quality.yaml --out results/study/quality`` every row but GISP with hidden
channels (``quality_gisp_hidden.yaml``'s options) is read from the cache. For every method and target the
script prints perplexity on held-apart text and six-task mean accuracy (BoolQ left out, docs/study.md), each
with its standard error, and the difference from GISP at the same target with the standard error of that
difference (conservative: both models see the same windows and questions, so the paired error is smaller).
A difference counts when it exceeds twice its standard error.

    python benchmarks/study_methods.py --out results/study --json results/study/methods.json
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
from study_runs import (
    Variant,
    add_common_arguments,
    add_drop_tasks_argument,
    by_target,
    diff_with_error,
    dropped,
    fmt,
    load_base,
    metric_table,
    ppl_metric,
    publish,
    row_summary,
    run_variant,
    sparsity_table,
)

from gisp_plugin.harness.runner import Row

VARIANTS = (
    Variant("gisp", "gisp"),
    Variant("gisp+hidden", "gisp", {"blocks": "all+hidden", "normalize": "param_mean"}),
    Variant("sleb", "sleb"),
    Variant("blockpruner", "blockpruner"),
    Variant("slimgpt", "slimgpt"),
    Variant("minitron", "minitron"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, "methods.json", plots=False)
    add_drop_tasks_argument(p)
    p.add_argument("--variants", default=",".join(v.label for v in VARIANTS), help="which rows (default: all six)")
    return p.parse_args(argv)


def ppl_with_error(row: Row, metric: str) -> tuple[float, float | None]:
    return row.metrics[metric], row.metrics.get(metric.replace("ppl[", "ppl_stderr["))


def against_gisp(rows: list[Row], metric: str) -> tuple[list[str], list[dict]]:
    """Markdown and JSON: each method's perplexity and accuracy minus GISP's at the same target, with errors."""
    gisp = by_target(rows, "gisp")
    lines = [
        "| method | target | ppl | ppl - GISP's (± se) | accuracy | accuracy - GISP's (± se) |",
        "|---|---|---|---|---|---|",
    ]
    out = []
    for row in rows:
        base = gisp.get(round(row.target, 4))
        if row.method == "gisp" or base is None:
            continue
        ppl, ppl_se = ppl_with_error(row, metric)
        base_ppl, base_se = ppl_with_error(base, metric)
        ppl_diff_se = math.sqrt(ppl_se**2 + base_se**2) if ppl_se is not None and base_se is not None else None
        acc_diff, acc_se = diff_with_error(row, base)
        out.append(
            {
                **row_summary(row),
                "ppl_minus_gisp": ppl - base_ppl,
                "ppl_minus_gisp_se": ppl_diff_se,
                "acc_minus_gisp": acc_diff,
                "acc_minus_gisp_se": acc_se,
            }
        )
        lines.append(
            f"| {row.method} | {row.target:.0%} | {ppl:.1f} | {ppl - base_ppl:+.1f} ± {fmt(ppl_diff_se, 1)} | "
            f"{fmt(row.metrics.get('mean_acc'), 3)} | "
            f"{'-' if acc_diff is None else f'{acc_diff:+.3f}'} ± {fmt(acc_se, 3)} |"
        )
    return lines, out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.config)
    wanted = set(args.variants.split(","))
    dense, rows = None, []
    for variant in VARIANTS:
        if variant.label in wanted:
            result = run_variant(base, variant, args.out, drop=dropped(args))
            dense, rows = result.dense, rows + result.rows
    metric = ppl_metric(rows)
    report = ["# Issue 20's methods against GISP (SmolLM2-135M, quality study setup)", ""]
    report += [f"Perplexity on held-apart text ({metric}):", ""] + metric_table(rows, dense, metric, digits=1)
    report += ["", "Mean accuracy (± standard error):", ""] + metric_table(rows, dense, "mean_acc", digits=3, with_se=True)
    lines, diffs = against_gisp(rows, metric)
    report += ["", "Against GISP at the same target:", ""] + lines
    report += ["", "Achieved sparsity:", ""] + sparsity_table(rows)
    json_path = args.json or args.out / "methods.json"
    publish(report, {"rows": [row_summary(r) for r in [dense, *rows]], "against_gisp": diffs}, json_path)


if __name__ == "__main__":
    main()
