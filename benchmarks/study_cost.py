"""What the methods cost and how fast their pruned models run, on the real SmolLM2-135M.

- ``time``: wall time of each method's pruning run (all targets) and per subnetwork, as the quality
  study's harness measured it (``gisp compare`` times every pruning run it does; cached runs keep their
  first timing).
- ``memory``: peak memory of each method, each in a fresh process: the peak resident set while it prunes
  to every target, minus what the process held with the model and calibration data loaded (so the
  number is the method's own working memory), and the absolute peak; the smallest of ``--memory-repeats``
  runs, since the process sometimes shows a few hundred MiB more for no reason of the method's (seen for
  magnitude and random: 9 vs 363 MiB in two runs). GISP runs one step here (every
  step does the same work on the same data, so its peak does not depend on the number of steps).
  The harness's own peak column is the whole process's (lm-eval, datasets and all), hence this probe.
- ``ratio``: a GISP step (gradients on the masked model over the calibration set, scores, ranking,
  masks) over a bare forward+backward of the dense model on the same tokens and micro-batches, in
  alternating pairs (``benchmarks/gisp_steps.py``'s ``paired_timing``).
- ``speed``: prefill and decode tokens/s of the compacted models of the quality study against the dense
  model, each measured in a fresh process (``benchmarks/compaction.py``'s measurement).

    python benchmarks/study_cost.py --help
    python benchmarks/study_cost.py --out results/study --json results/study/cost.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from compaction import lm_head_params, measure_folder_in_subprocess
from gisp_steps import paired_timing
from study_runs import QUALITY_FOLDER, add_common_arguments, fmt, load_base, publish

from gisp_plugin.checkpoint.saving import save_pruned
from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.harness.config import ComparisonConfig
from gisp_plugin.harness.memory import PeakMemory, peak_rss_bytes
from gisp_plugin.harness.runner import Comparison
from gisp_plugin.models.loading import load_model
from gisp_plugin.pruning import compact_subnetwork, pruning_record, resolve_method, run_method

PARTS = ("time", "memory", "ratio", "speed")
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, "cost.json", plots=False)
    p.add_argument("--parts", default=",".join(PARTS), help=f"what to measure (default {','.join(PARTS)})")
    p.add_argument("--speed-methods", default="gisp,wanda_sp,flap,llm_pruner", help="methods whose compacted models are timed")
    p.add_argument("--batch", type=int, default=4, help="prefill batch (default 4)")
    p.add_argument("--seqlen", type=int, default=256, help="prefill tokens per sequence (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after a warm-up (default 5)")
    p.add_argument("--decode-tokens", type=int, default=32, help="new tokens for the decode measurement (default 32)")
    p.add_argument("--bare-repeats", type=int, default=3, help="alternating bare / GISP-step pairs (default 3)")
    p.add_argument(
        "--memory-repeats", type=int, default=3, help="fresh processes per method; the smallest peak is kept (default 3)"
    )
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resident_bytes() -> int:
    """The process's current resident set (VmRSS), not its high-water mark."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def probe_memory(base: ComparisonConfig, method: str) -> dict:
    """Subprocess body: one method's pruning run to every target, peak RSS above the loaded state."""
    model, tokenizer = load_model(base.model, base.device, base.dtype)
    spec, _ = resolve_method(method, base.method_options.get(method, {}))
    options = dict(base.method_options.get(method, {}))
    if method == "gisp":
        options["steps"] = "1"
    calibration = None
    if spec.calibration is not None:
        calibration = load_calibration(CalibrationRequest(base.calibration, base.n_samples, base.seqlen, base.seed), tokenizer)
    with torch.no_grad():  # page the memory-mapped weights in: their first touch is not the method's memory
        for parameter in model.parameters():
            parameter.sum()
    loaded = resident_bytes()
    started = time.perf_counter()
    with PeakMemory(model) as memory:
        for _ in run_method(model, tokenizer, method, base.sparsities, options, calibration, base.seed):
            pass
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {
        "method": method,
        "options": options,
        "peak_bytes": memory.peak_bytes,
        "loaded_bytes": loaded,
        "above_loaded_bytes": memory.peak_bytes - loaded,
        "weights_bytes": weights,
        "wall_s": time.perf_counter() - started,
    }


def memory_in_subprocess(args: argparse.Namespace, method: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", method, "--out", str(args.out)]
    if args.config:
        cmd += ["--config", str(args.config)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def speed(comparison: Comparison, args: argparse.Namespace, report: list[str]) -> list[dict]:
    """Dense and compacted models of the quality study, each timed in a fresh process."""
    base = comparison.config
    measure_args = argparse.Namespace(
        batch=args.batch, seqlen=args.seqlen, repeats=args.repeats, dtype=base.dtype, decode_tokens=args.decode_tokens
    )
    model, tokenizer = comparison.model, comparison.tokenizer
    dense_compute = sum(p.numel() for p in model.model.layers.parameters()) + lm_head_params(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dense"
        model.save_pretrained(folder)
        dense = measure_folder_in_subprocess(folder, measure_args)
        rows.append({"method": "dense", "target": 0.0, "sparsity": 0.0, "bound": 1.0, **dense})
        for method in [m.strip() for m in args.speed_methods.split(",") if m.strip()]:
            subnetworks, _ = comparison.prune(method)
            for s in subnetworks:
                compact, params = compact_subnetwork(model, s, comparison.pad_to)
                folder = Path(tmp) / f"{method}-{s.target:.2f}"
                record = pruning_record(base.model, method, comparison.methods[method], s, compact, params, None, base.seed)
                save_pruned(compact, tokenizer, folder, record)
                bound = dense_compute / (params["decoder"] + lm_head_params(compact))
                result = measure_folder_in_subprocess(folder, measure_args)
                rows.append(
                    {
                        "method": method,
                        "target": s.target,
                        "sparsity": 1 - params["decoder"] / params["decoder_dense"],
                        "bound": bound,
                        **result,
                    }
                )
                del compact
    for row in rows:
        row["prefill_speedup"] = row["tokens_per_s"] / dense["tokens_per_s"]
        row["decode_speedup"] = row.get("decode_tokens_per_s", 0) / dense.get("decode_tokens_per_s", 1)
    report += [
        "## Speed of the pruned models",
        "",
        f"Prefill: batch {args.batch} x {args.seqlen} random tokens, median of {args.repeats}; decode: {args.decode_tokens} "
        f"greedy tokens after a 16-token prompt, batch {args.batch}; {base.dtype}, {torch.get_num_threads()} threads, "
        "one fresh process per model. Bound: (dense decoder + LM head params) / (pruned decoder + LM head params).",
        "",
        "| method | target | sparsity | prefill tok/s | prefill speedup | bound | decode tok/s | decode speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        report.append(
            f"| {r['method']} | {r['target']:.0%} | {r['sparsity']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['prefill_speedup']:.2f}x | {r['bound']:.2f}x | {r.get('decode_tokens_per_s', 0):.1f} | "
            f"{r['decode_speedup']:.2f}x |"
        )
    report.append("")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.memory_probe else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base(args.config)
    if args.memory_probe:
        print(json.dumps(probe_memory(base, args.memory_probe)))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    started = time.perf_counter()
    comparison = Comparison(base, args.out / QUALITY_FOLDER)
    result = comparison.run()  # cached after `gisp compare --config ... --out OUT/quality`
    report = [f"# Cost of pruning on {base.model} ({base.device}, {base.dtype}, {torch.get_num_threads()} threads)", ""]
    out: dict = {"base": base.to_json()}
    costs = {c.method: c for c in result.costs}
    if "time" in parts:
        steps = base.method_options.get("gisp", {}).get("steps", "16")
        report += [
            f"## Wall time (calibration {base.calibration} {base.n_samples} x {base.seqlen}; GISP steps={steps}; "
            f"targets {', '.join(f'{t:.0%}' for t in base.sparsities)})",
            "",
            "| method | pruning run, all targets (s) | per subnetwork (s) | harness peak RSS (MiB, whole process) |",
            "|---|---|---|---|",
        ]
        for c in result.costs:
            report.append(
                f"| {c.method} | {c.prune_time_s:.1f} | {c.time_per_subnetwork_s:.1f} | {c.peak_memory_bytes / MiB:.0f} |"
            )
        report.append("")
        out["time"] = [
            {
                "method": c.method,
                "prune_time_s": c.prune_time_s,
                "time_per_subnetwork_s": c.time_per_subnetwork_s,
                "harness_peak_bytes": c.peak_memory_bytes,
                "cached": c.cached,
            }
            for c in result.costs
        ]
    if "memory" in parts:
        probes = [
            min((memory_in_subprocess(args, method) for _ in range(args.memory_repeats)), key=lambda p: p["above_loaded_bytes"])
            for method in costs
        ]
        report += [
            f"## Peak memory (fresh process per method, smallest of {args.memory_repeats}; GISP one step)",
            "",
            "| method | peak RSS (MiB) | above model + data loaded (MiB) | over weights |",
            "|---|---|---|---|",
        ]
        for p in probes:
            report.append(
                f"| {p['method']} | {p['peak_bytes'] / MiB:.0f} | {p['above_loaded_bytes'] / MiB:.0f} | "
                f"{p['above_loaded_bytes'] / p['weights_bytes']:.2f} |"
            )
        report += ["", f"Weights: {probes[0]['weights_bytes'] / MiB:.0f} MiB (float32).", ""]
        out["memory"] = probes
    if "ratio" in parts:
        calibration = comparison.calibration()
        gisp_options = base.method_options.get("gisp", {})
        ns = argparse.Namespace(
            targets=str(min(base.sparsities)),
            batch_size=int(gisp_options.get("batch_size", 2)),
            seed=base.seed,
            bare_repeats=args.bare_repeats,
            gradient_checkpointing=str(gisp_options.get("gradient_checkpointing", "false")).lower() == "true",
        )
        timing = paired_timing(comparison.model, comparison.tokenizer, calibration, ns)
        out["ratio"] = {**timing, "tokens": calibration.num_tokens, "batch_size": ns.batch_size}
        report += [
            "## GISP step vs bare forward+backward",
            "",
            f"{calibration.num_tokens} calibration tokens, micro-batch {ns.batch_size}: bare forward+backward "
            f"{fmt(min(timing['bare_s']))} s, GISP step {fmt(min(timing['gisp_step_s']))} s; ratio "
            f"{timing['step_over_bare']:.3f} (median of {len(timing['step_over_bare_all'])} alternating pairs: "
            f"{', '.join(f'{r:.3f}' for r in timing['step_over_bare_all'])}).",
            "",
        ]
    if "speed" in parts:
        out["speed"] = speed(comparison, args, report)
    out["wall_s"] = time.perf_counter() - started
    publish(report, out, args.json or args.out / "cost.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
