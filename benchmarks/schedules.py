"""GISP schedules at equal gradient passes: linear vs cosine vs exponential vs adaptive.

For every ``--steps`` value and every ``--schedules`` entry, one GISP run prunes to all ``--targets``
(nested subnetworks, ``steps`` gradient passes whatever the schedule) and each subnetwork's perplexity
is measured on held-apart text. Also recorded per run: where each pass cut to (the schedule's ends),
the calibration loss each pass measured, the achieved sparsities and the pruning time (GISP's own
``elapsed_s``, perplexity excluded).

Defaults fit a few CPU cores: SmolLM2-135M, 16 x 128 LAMBADA-novel windows for calibration, perplexity on
32 x 128-token windows of the BoolQ Wikipedia passages (an offline stand-in for WikiText-2). Runs go
steps-major (every schedule at 4 steps, then at 8, ...) and the JSON is written after each, so an
interrupted benchmark keeps its finished rows; ``--resume`` skips the runs the JSON already holds.

    python benchmarks/schedules.py --help
    python benchmarks/schedules.py --json results/schedules.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.evaluation.perplexity import evaluation_text, text_windows, window_nll
from gisp_plugin.methods.gisp_schedules import SCHEDULES
from gisp_plugin.models.loading import load_model, parse_dtype
from gisp_plugin.pruning import run_method


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help=f"schedules to compare (default {','.join(SCHEDULES)})")
    p.add_argument("--steps", default="4,8,16", help="gradient passes per run (default 4,8,16)")
    p.add_argument("--targets", default="0.3,0.4,0.5", help="sparsity targets (default 0.3,0.4,0.5)")
    p.add_argument("--exp-alpha", type=float, default=3.0, help="GISP option exp_alpha of the exponential schedule")
    p.add_argument("--adaptive-limit", type=float, default=2.0, help="GISP option adaptive_limit of the adaptive schedule")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--calibration", default="lambada-novels", help="calibration source (default lambada-novels)")
    p.add_argument("--n-samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per forward/backward (default 2, the reference)")
    p.add_argument("--eval-source", default="boolq-wiki", help="perplexity text source (default boolq-wiki)")
    p.add_argument("--eval-seqlen", type=int, default=128, help="perplexity context length (default 128)")
    p.add_argument("--eval-windows", type=int, default=32, help="perplexity windows (default 32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="keep the runs already in --json and do only the others")
    p.add_argument("--json", type=Path, default=Path("results/schedules.json"), help="where to save the results")
    return p.parse_args(argv)


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    with parametrize.cached():  # masks computed once per evaluation, not once per forward
        return math.exp(window_nll(model, windows, batch_size=8) / (windows.shape[0] * (windows.shape[1] - 1)))


def gisp_options(args: argparse.Namespace, schedule: str, steps: int) -> dict[str, str]:
    options = {"steps": str(steps), "batch_size": str(args.batch_size), "schedule": schedule}
    if schedule == "exponential":
        options["exp_alpha"] = str(args.exp_alpha)
    if schedule == "adaptive":
        options["adaptive_limit"] = str(args.adaptive_limit)
    return options


def passes(trajectory: Trajectory) -> list[dict]:
    """One entry per gradient pass: the sparsity it ran at, its calibration loss, where it cut to."""
    out: dict[int, dict] = {}
    for info in trajectory.steps:
        entry = out.setdefault(info["gradient_step"], {"at": info["gradient_at_sparsity"], "loss": info["loss"]})
        entry["end"] = info["scheduled"]
    return [out[k] for k in sorted(out)]


def one_run(model, tokenizer, calibration, windows, args: argparse.Namespace, schedule: str, steps: int) -> dict:
    targets = [float(t) for t in args.targets.split(",")]
    trajectory = Trajectory()
    ppl: dict[str, float] = {}
    started = time.perf_counter()
    for subnetwork in run_method(
        model, tokenizer, "gisp", targets, gisp_options(args, schedule, steps), calibration, args.seed, trajectory=trajectory
    ):
        ppl[f"{subnetwork.target:.2f}"] = perplexity(model, windows)
    return {
        "schedule": schedule,
        "steps": steps,
        "gradient_passes": len(passes(trajectory)),
        "ppl": ppl,
        "sparsity": {f"{s['target']:.2f}": s["sparsity"] for s in trajectory.steps if s["target"] is not None},
        "passes": passes(trajectory),
        "pruning_s": trajectory.steps[-1]["elapsed_s"],
        "wall_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    unknown = sorted(set(schedules) - set(SCHEDULES))
    if unknown:
        raise SystemExit(f"unknown schedule {unknown[0]!r}; available: {', '.join(SCHEDULES)}")
    steps_grid = [int(s) for s in args.steps.split(",") if s.strip()]
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, args.device, dtype)
    calibration = load_calibration(CalibrationRequest(args.calibration, args.n_samples, args.seqlen, args.seed), tokenizer)
    windows, _ = text_windows(tokenizer, evaluation_text(args.eval_source), args.eval_seqlen, max_windows=args.eval_windows)
    setup = {
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "calibration": calibration.name,
        "calibration_tokens": calibration.num_tokens,
        "batch_size": args.batch_size,
        "perplexity_on": f"{args.eval_source} evaluation part, {windows.shape[0]} x {args.eval_seqlen}",
        "targets": [float(t) for t in args.targets.split(",")],
        "exp_alpha": args.exp_alpha,
        "adaptive_limit": args.adaptive_limit,
    }
    results: dict = {"setup": setup, "runs": []}
    if args.resume and args.json.exists():
        results["runs"] = json.loads(args.json.read_text())["runs"]
    print(json.dumps(setup), flush=True)
    results["dense_ppl"] = perplexity(model, windows)
    print(f"dense perplexity {results['dense_ppl']:.2f}", flush=True)

    done = {(r["schedule"], r["steps"]) for r in results["runs"]}
    for steps in steps_grid:
        for schedule in schedules:
            if (schedule, steps) in done:
                continue
            run = one_run(model, tokenizer, calibration, windows, args, schedule, steps)
            results["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "passes"}), flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"saved {args.json}")
    return 0


def print_table(results: dict) -> None:
    """A markdown table: one row per (steps, schedule), best perplexity per (steps, target) in bold."""
    setup = results["setup"]
    targets = [f"{t:.2f}" for t in setup["targets"]]
    runs = sorted(results["runs"], key=lambda r: (r["steps"], SCHEDULES.index(r["schedule"])))
    print()
    print(f"GISP schedules on {setup['model']} ({setup['device']}, {setup['dtype']}), calibration {setup['calibration']}")
    print(f"perplexity on {setup['perplexity_on']}; dense {results['dense_ppl']:.2f}")
    print("| steps | schedule | " + " | ".join(f"ppl @ {float(t):.0%}" for t in targets) + " | pass ends | pruning s |")
    print("|---" * (len(targets) + 4) + "|")
    for run in runs:
        peers = [r for r in runs if r["steps"] == run["steps"]]
        cells = []
        for t in targets:
            best = min(r["ppl"].get(t, math.inf) for r in peers)
            value = run["ppl"].get(t)
            cells.append("-" if value is None else f"**{value:.1f}**" if value == best and len(peers) > 1 else f"{value:.1f}")
        ends = ", ".join(f"{p['end']:.2f}" for p in run["passes"])
        print(f"| {run['steps']} | {run['schedule']} | " + " | ".join(cells) + f" | {ends} | {run['pruning_s']:.0f} |")


if __name__ == "__main__":
    raise SystemExit(main())
