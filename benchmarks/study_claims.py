"""The GISP paper's three claims, checked on the real SmolLM2-135M with offline data.

(a) Iterative beats one-shot at 50%: GISP with the quality study's ``steps`` against ``steps=1`` (one
    gradient pass on the dense model, every target cut from it), same calibration, every sparsity.
(b) GISP beats the local methods at 40-50%: read from the quality study. "Local" = every layer loses
    the same fraction (Wanda-sp, LLM-Pruner); FLAP (AL-AM: adaptive, global) is shown beside them.
(c) Task-aligned calibration raises GISP's task accuracy more than Wanda-sp's: GISP with
    ``loss=margin`` on ``cmqa-offline`` against GISP with ``ntp`` on ``lambada-novels``, and Wanda-sp on
    the same two sources, at the same token budget (``n_samples x seqlen``); mean zero-shot accuracy
    over the seven tasks. ``cmqa-offline`` draws only the calibration part of each task file
    (index % 4 == 0); lm-eval evaluates only the evaluation part (index % 4 != 0): disjoint questions.

Every run goes through the comparison harness (``study_runs``): variants of the quality configuration
share its results folder and cache, so after ``gisp compare --config benchmarks/configs/quality.yaml
--out results/study/quality`` only the new runs (GISP one-shot; the cmqa-calibrated runs) cost time.
A difference in mean accuracy counts as real when it exceeds twice its standard error.

    python benchmarks/study_claims.py --help
    python benchmarks/study_claims.py --out results/study --json results/study/claims.json
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from study_runs import (
    Variant,
    add_common_arguments,
    add_drop_tasks_argument,
    block_split,
    by_target,
    diff_with_error,
    dropped,
    fmt,
    load_base,
    metric_table,
    ppl_metric,
    publish,
    row_summary,
    run_base,
    run_variant,
    sparsity_table,
)

from gisp_plugin.harness.report import plot_metric
from gisp_plugin.harness.runner import Row

LOCAL_METHODS = ("wanda_sp", "llm_pruner")
GLOBAL_BASELINES = ("flap",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, "claims.json")
    p.add_argument("--claims", default="a,b,c", help="which claims to check (default a,b,c)")
    p.add_argument("--one-shot-steps", type=int, default=1, help="GISP steps of the one-shot run (default 1)")
    p.add_argument("--at", type=float, default=0.5, help="claim (a)'s sparsity (default 0.5)")
    p.add_argument("--high", default="0.4,0.5", help="claim (b)'s sparsities (default 0.4,0.5)")
    p.add_argument("--task-calibration", default="cmqa-offline", help="claim (c)'s task-aligned source (default cmqa-offline)")
    p.add_argument("--task-loss", default="margin", help="GISP loss on the task-aligned data (default margin)")
    p.add_argument(
        "--task-n-samples",
        type=int,
        default=None,
        help="claim (c)'s token budget in windows of seqlen, for both sources (default: the base config's n_samples)",
    )
    p.add_argument("--task-sparsities", default=None, help="claim (c)'s sparsities (default: the base config's)")
    add_drop_tasks_argument(p)
    return p.parse_args(argv)


def compare(a: Row, b: Row) -> dict:
    """``a`` against ``b``: perplexity ratio and accuracy difference with its standard error."""
    diff, se = diff_with_error(a, b)
    ppl = ppl_metric([a, b])
    ppl_a, ppl_b = (a.metrics.get(ppl), b.metrics.get(ppl)) if ppl else (None, None)
    return {
        "a": row_summary(a),
        "b": row_summary(b),
        "ppl_ratio": ppl_a / ppl_b if ppl_a and ppl_b else None,
        "ppl_better": ppl_a < ppl_b if ppl_a and ppl_b else None,
        "acc_diff": diff,
        "acc_diff_se": se,
        "acc_better": diff > 0 if diff is not None else None,
        "acc_significant": abs(diff) > 2 * se if diff is not None and se else None,
    }


def beats_verdict(c: dict) -> str:
    """Plain words for "a beats b" from perplexity and accuracy."""
    acc = c["acc_diff"]
    noise = "" if acc is None or c["acc_significant"] else " (accuracy difference within noise)"
    if c["ppl_better"] and (acc is None or acc > 0):
        return "replicated" + noise
    if c["ppl_better"]:
        return "replicated on perplexity only; accuracy lower" + noise
    if acc is not None and acc > 0:
        return "not replicated on perplexity; accuracy higher" + noise
    return "not replicated"


def describe(c: dict) -> str:
    a, b = c["a"], c["b"]
    acc = "" if c["acc_diff"] is None else f"; mean acc {fmt(a['mean_acc'], 4)} vs {fmt(b['mean_acc'], 4)} "
    acc += "" if c["acc_diff"] is None else f"(diff {c['acc_diff']:+.4f} ± {fmt(c['acc_diff_se'], 4)})"
    return f"ppl {fmt(a['ppl'])} vs {fmt(b['ppl'])} (ratio {fmt(c['ppl_ratio'], 3)}){acc}"


def claim_a(base, args, quality_rows: list[Row], dense: Row, report: list[str], plots: Path) -> dict:
    steps = int(base.method_options.get("gisp", {}).get("steps", 16))
    iterative = f"gisp steps={steps}"
    one_shot = run_variant(
        base,
        Variant(f"gisp steps={args.one_shot_steps}", "gisp", {"steps": str(args.one_shot_steps)}),
        args.out,
        drop=dropped(args),
    )
    rows = [Row(iterative, r.target, r.sparsity, r.metrics, r.details) for r in quality_rows if r.method == "gisp"]
    rows += one_shot.rows
    iters, shots = by_target(rows, iterative), by_target(rows, one_shot.variant.label)
    per_target = {f"{t:.2f}": compare(iters[t], shots[t]) for t in sorted(iters) if t in shots}
    at = per_target.get(f"{args.at:.2f}")
    verdict = beats_verdict(at) if at else "not measured (target missing)"
    ppl = ppl_metric(rows)
    report += [f"## Claim (a): iterative ({iterative}) beats one-shot ({one_shot.variant.label}) at {args.at:.0%}", ""]
    if ppl:
        report += [f"### {ppl}", "", *metric_table(rows, dense, ppl), ""]
        plot_metric(rows, dense, ppl, plots / "claim_a_ppl.png", f"GISP iterative vs one-shot, {ppl}")
    if "mean_acc" in dense.metrics:
        report += ["### mean_acc (± standard error)", "", *metric_table(rows, dense, "mean_acc", 4, with_se=True), ""]
    report += [f"**Verdict (a): {verdict}.** At {args.at:.0%}: {describe(at)}." if at else f"**Verdict (a): {verdict}.**", ""]
    return {"iterative": iterative, "one_shot": one_shot.variant.label, "per_target": per_target, "verdict": verdict}


def claim_b(args, quality_rows: list[Row], dense: Row, report: list[str]) -> dict:
    high = [float(t) for t in args.high.split(",")]
    gisp = by_target(quality_rows, "gisp")
    results: dict = {}
    report += [f"## Claim (b): GISP beats the local methods at {', '.join(f'{t:.0%}' for t in high)}", ""]
    report += [
        "| vs | target | GISP ppl | other ppl | GISP acc | other acc | acc diff ± se | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for method in (*LOCAL_METHODS, *GLOBAL_BASELINES):
        other = by_target(quality_rows, method)
        for t in high:
            key = round(t, 4)
            if key not in gisp or key not in other:
                continue
            c = compare(gisp[key], other[key])
            c["verdict"] = beats_verdict(c)
            results[f"{method}@{t:.2f}"] = c
            if method in LOCAL_METHODS:
                verdicts.append(c)
            report.append(
                f"| {method} (sparsity {c['b']['sparsity']:.3f}) | {t:.0%} | {fmt(c['a']['ppl'])} | {fmt(c['b']['ppl'])} | "
                f"{fmt(c['a']['mean_acc'], 4)} | {fmt(c['b']['mean_acc'], 4)} | "
                f"{fmt(c['acc_diff'], 4)} ± {fmt(c['acc_diff_se'], 4)} | {c['verdict']} |"
            )
    report.append("")
    ppl_wins = sum(bool(c["ppl_better"]) for c in verdicts)
    acc_wins = sum(bool(c["acc_better"]) for c in verdicts)
    acc_sig = sum(bool(c["acc_better"]) and bool(c["acc_significant"]) for c in verdicts)
    n = len(verdicts)
    if n and ppl_wins == n and acc_sig == n:
        verdict = "replicated"
    elif n and ppl_wins == n and acc_wins == n:
        verdict = "replicated on perplexity; accuracy higher everywhere but within noise"
    elif n and ppl_wins == n:
        verdict = "replicated on perplexity; not on accuracy everywhere"
    elif n and ppl_wins:
        verdict = "partly replicated"
    else:
        verdict = "not replicated"
    summary = (
        f"GISP has the lower perplexity in {ppl_wins} of {n} (local method, sparsity) pairs and the higher mean accuracy "
        f"in {acc_wins} of {n} ({acc_sig} by more than twice the standard error)"
    )
    report += [f"**Verdict (b): {verdict}.** {summary}.", ""]
    return {"pairs": results, "verdict": verdict, "summary": summary}


def where_methods_cut(base, args, report: list[str]) -> dict:
    """Fraction of attention and of MLP parameters each method of the quality study removed, per target."""
    methods = [m for m in ("gisp", *LOCAL_METHODS, *GLOBAL_BASELINES) if m in base.methods]
    split = block_split(base, args.out, methods)
    targets = sorted({t for per_target in split.values() for t in per_target})
    report += [
        "Where the methods cut: fraction of attention / MLP parameters removed:",
        "",
        f"| method | {' | '.join(f'{t:.0%}' for t in targets)} |",
        "|---|" + "---|" * len(targets),
    ]
    for method, per_target in split.items():
        cells = [f"{per_target[t]['attention']['removed']:.2f} / {per_target[t]['mlp']['removed']:.2f}" for t in targets]
        report.append(f"| {method} | {' | '.join(cells)} |")
    report.append("")
    return {method: {f"{t:.2f}": blocks for t, blocks in per_target.items()} for method, per_target in split.items()}


def claim_c(base, args, dense: Row, report: list[str], plots: Path) -> dict:
    n_samples = args.task_n_samples or base.n_samples
    shared = {"n_samples": n_samples}
    if args.task_sparsities:
        shared["sparsities"] = [float(t) for t in args.task_sparsities.split(",")]
    task = {**shared, "calibration": args.task_calibration}
    text = base.calibration
    variants = [
        Variant(f"gisp ntp on {text}", "gisp", {}, shared),
        Variant(f"wanda_sp on {text}", "wanda_sp", {}, shared),
        Variant(f"gisp {args.task_loss} on {args.task_calibration}", "gisp", {"loss": args.task_loss}, task),
        Variant(f"wanda_sp on {args.task_calibration}", "wanda_sp", {}, task),
    ]
    runs = [
        run_variant(base, v, args.out, drop=dropped(args)) for v in variants
    ]  # text side at the base size: the quality study's cache
    rows = [r for run in runs for r in run.rows]
    gisp_text, wanda_text, gisp_task, wanda_task = (v.label for v in variants)
    pairs = {
        "gisp": (by_target(rows, gisp_task), by_target(rows, gisp_text)),
        "wanda_sp": (by_target(rows, wanda_task), by_target(rows, wanda_text)),
    }
    gains: dict = {"gisp": {}, "wanda_sp": {}}
    for method, (task, plain) in pairs.items():
        for t in sorted(task):
            if t in plain:
                diff, se = diff_with_error(task[t], plain[t])
                gains[method][f"{t:.2f}"] = {
                    "gain": diff,
                    "se": se,
                    "ppl_task": row_summary(task[t])["ppl"],
                    "ppl_text": row_summary(plain[t])["ppl"],
                }
    common = sorted(
        k
        for k in set(gains["gisp"]) & set(gains["wanda_sp"])
        if None not in (gains["gisp"][k]["gain"], gains["wanda_sp"][k]["gain"])
    )
    report += [
        f"## Claim (c): task-aligned calibration ({args.task_calibration}, GISP loss={args.task_loss}) raises GISP's "
        f"accuracy more than Wanda-sp's",
        "",
        f"Same token budget: {n_samples} x {base.seqlen} tokens of {text} or of {args.task_calibration}. "
        f"{args.task_calibration} uses the calibration part (index % 4 == 0) of the task files; lm-eval evaluates the "
        "evaluation part (index % 4 != 0): no question is in both.",
        "",
        "### mean_acc (± standard error)",
        "",
        *metric_table(rows, dense, "mean_acc", 4, with_se=True),
        "",
    ]
    ppl = ppl_metric(rows)
    if ppl:
        report += [f"### {ppl}", "", *metric_table(rows, dense, ppl), ""]
    report += [
        "### Accuracy gain from task-aligned calibration",
        "",
        "| target | GISP gain ± se | Wanda-sp gain ± se | GISP gain - Wanda-sp gain ± se |",
        "|---|---|---|---|",
    ]
    extra = []
    for key in common:
        g, w = gains["gisp"][key], gains["wanda_sp"][key]
        se = math.sqrt(g["se"] ** 2 + w["se"] ** 2) if g["se"] is not None and w["se"] is not None else None
        extra.append((g["gain"] - w["gain"], se))
        report.append(
            f"| {float(key):.0%} | {g['gain']:+.4f} ± {fmt(g['se'], 4)} | {w['gain']:+.4f} ± {fmt(w['se'], 4)} | "
            f"{extra[-1][0]:+.4f} ± {fmt(se, 4)} |"
        )
    report.append("")
    if not common:
        verdict, summary = "not measured", "no accuracy at common sparsities (an lm_eval evaluation is needed)"
    else:
        mean_g = sum(gains["gisp"][k]["gain"] for k in common) / len(common)
        mean_w = sum(gains["wanda_sp"][k]["gain"] for k in common) / len(common)
        mean_extra = sum(e for e, _ in extra) / len(extra)
        ses = [se for _, se in extra if se is not None]
        mean_se = math.sqrt(sum(s * s for s in ses)) / len(ses) if len(ses) == len(extra) else None
        significant = mean_se is not None and abs(mean_extra) > 2 * mean_se
        if mean_g > mean_w and mean_g > 0:
            verdict = "replicated" + ("" if significant else " in direction, but within noise")
        elif mean_g > 0:
            verdict = "not replicated: task-aligned calibration helps Wanda-sp at least as much" + (
                "" if significant else " (within noise)"
            )
        else:
            verdict = "not replicated: task-aligned calibration does not raise GISP's accuracy" + (
                "" if significant else " (within noise)"
            )
        summary = (
            f"mean over {len(common)} sparsities: GISP {mean_g:+.4f}, Wanda-sp {mean_w:+.4f}, "
            f"difference {mean_extra:+.4f} ± {fmt(mean_se, 4)}"
        )
    report += [f"**Verdict (c): {verdict}.** {summary}.", ""]
    if "mean_acc" in dense.metrics:
        plot_metric(rows, dense, "mean_acc", plots / "claim_c_mean_acc.png", "task-aligned vs text calibration")
    return {
        "gains": gains,
        "verdict": verdict,
        "summary": summary,
        "folders": sorted({str(run.folder) for run in runs}),
        "calibration_notes": {"task": args.task_calibration, "text": text, "tokens": n_samples * base.seqlen},
        "rows": [row_summary(r) for r in rows],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.config)
    claims = {c.strip() for c in args.claims.split(",") if c.strip()}
    unknown = claims - {"a", "b", "c"}
    if unknown:
        raise SystemExit(f"unknown claim {sorted(unknown)[0]!r}; choose from a, b, c")
    plots = args.plots or args.out / "plots"
    started = time.perf_counter()
    dense, quality_rows = run_base(base, args.out, dropped(args))  # cached after `gisp compare ... --out OUT/quality`
    report = [
        f"# The paper's claims on {base.model}",
        "",
        f"Base comparison: {args.config or 'benchmarks/configs/quality.yaml'}; "
        f"calibration {base.calibration} {base.n_samples} x {base.seqlen}; evaluations: {', '.join(base.evals)}; "
        f"mean_acc leaves out: {', '.join(sorted(dropped(args))) or 'nothing'}.",
        "",
    ]
    results: dict = {"base": base.to_json(), "quality_folder": str(args.out / "quality")}
    if "a" in claims:
        results["a"] = claim_a(base, args, quality_rows, dense, report, plots)
    if "b" in claims:
        results["b"] = claim_b(args, quality_rows, dense, report)
        report += ["Achieved sparsity of the quality study:", "", *sparsity_table(quality_rows), ""]
        report += ["Mean accuracy of the quality study (± standard error):", ""]
        report += [*metric_table(quality_rows, dense, "mean_acc", 4, with_se=True), ""]
        results["b"]["blocks"] = where_methods_cut(base, args, report)
    if "c" in claims:
        results["c"] = claim_c(base, args, dense, report, plots)
    results["wall_s"] = time.perf_counter() - started
    publish(report, results, args.json or args.out / "claims.json", f"; plots in {plots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
