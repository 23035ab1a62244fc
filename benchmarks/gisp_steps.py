"""GISP: does iterating help, what does a step cost, how much memory does it take?

For every ``--steps`` value, one GISP run prunes to all ``--targets`` (its subnetworks are nested) and
each subnetwork's perplexity is measured on held-out text (the paper's claim: iterative beats one-shot,
most at high sparsity). The cost of a step (gradients over the calibration set on the masked model,
scores, ranking) is divided by a bare forward+backward of the dense model over the same tokens with the
same micro-batches (the issue's aim: <= 1.10). Peak memory of a GISP run is compared with the model's
weights (CPU: the process's peak RSS, reset before each stretch; CUDA: the allocator's peak).

Defaults fit a few CPU cores: SmolLM2-135M, 16 x 128 LAMBADA-novel windows for calibration,
perplexity on 32 x 128-token windows of the BoolQ Wikipedia passages (not WikiText-2: offline stand-in).
``--synthetic`` uses a randomly initialised model of the same shape and random tokens: timing and memory
only (for machines without the offline assets, e.g. a GPU box).

    python benchmarks/gisp_steps.py --help
    python benchmarks/gisp_steps.py --json results/gisp_steps_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from shapes import SHAPES, random_model
from torch.nn.utils import parametrize

from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationRequest, CalibrationSet
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.evaluation.perplexity import evaluation_text, text_windows, window_nll
from gisp_plugin.harness.memory import PeakMemory, peak_rss_bytes
from gisp_plugin.models.loading import load_model, parse_dtype
from gisp_plugin.pruning import run_method


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    p.add_argument("--synthetic", action="store_true", help="random-init model and random tokens (timing and memory only)")
    p.add_argument("--synthetic-shape", choices=sorted(SHAPES), default="smollm2", help="shape of the random model")
    p.add_argument("--gradient-checkpointing", action="store_true", help="GISP option gradient_checkpointing=true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--steps", default="1,4,16,32", help="GISP step counts to compare (default 1,4,16,32)")
    p.add_argument("--targets", default="0.3,0.4,0.5", help="sparsity targets (default 0.3,0.4,0.5)")
    p.add_argument("--calibration", default="lambada-novels", help="calibration source (default lambada-novels)")
    p.add_argument("--n-samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=2, help="sequences per forward/backward (default 2, the reference)")
    p.add_argument("--eval-source", default="boolq-wiki", help="perplexity text source (default boolq-wiki)")
    p.add_argument("--eval-seqlen", type=int, default=128, help="perplexity context length (default 128)")
    p.add_argument("--eval-windows", type=int, default=32, help="perplexity windows (default 32)")
    p.add_argument("--bare-repeats", type=int, default=3, help="alternating bare / GISP-step timing pairs (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; 1 on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-probe", choices=["bare", "gisp"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=Path("results/gisp_steps.json"), help="where to save the results")
    return p.parse_args(argv)


def synthetic_calibration(n: int, seqlen: int, vocab: int, seed: int) -> CalibrationSet:
    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(f"random:{n}x{seqlen}", list(ids))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward_backward(model, calibration: CalibrationSet, batch_size: int) -> float:
    """Seconds for a plain forward+backward of the dense model over every calibration batch (all grads)."""
    device = next(model.parameters()).device
    sync(device)
    started = time.perf_counter()
    with torch.enable_grad():
        for batch in calibration.batches(batch_size):
            batch = batch.to(device)
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, use_cache=False)
            out.loss.backward()
    sync(device)
    elapsed = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return elapsed


def perplexity(model, windows: torch.Tensor) -> float:
    with parametrize.cached():  # masks computed once per evaluation, not once per forward
        return math.exp(window_nll(model, windows, batch_size=8) / (windows.shape[0] * (windows.shape[1] - 1)))


def step_times(trajectory: Trajectory) -> list[float]:
    """Wall time of each gradient step (its last cut's ``step_time_s``)."""
    last: dict[int, float] = {}
    for info in trajectory.steps:
        last[info["gradient_step"]] = info["step_time_s"]
    return [last[k] for k in sorted(last)]


def load_setup(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Model, tokenizer, calibration set and perplexity windows (``None`` for synthetic runs)."""
    if args.synthetic:
        model = random_model(args.synthetic_shape, args.device, dtype)
        return model, None, synthetic_calibration(args.n_samples, args.seqlen, model.config.vocab_size, args.seed), None
    model, tokenizer = load_model(args.model, args.device, dtype)
    calibration = load_calibration(CalibrationRequest(args.calibration, args.n_samples, args.seqlen, args.seed), tokenizer)
    windows, _ = text_windows(tokenizer, evaluation_text(args.eval_source), args.eval_seqlen, max_windows=args.eval_windows)
    return model, tokenizer, calibration, windows


def gisp_options(args: argparse.Namespace, steps: int) -> dict[str, str]:
    options = {"steps": str(steps), "batch_size": str(args.batch_size)}
    if args.gradient_checkpointing:
        options["gradient_checkpointing"] = "true"
    return options


def memory_probe(args: argparse.Namespace, what: str) -> dict:
    """Peak memory of one bare forward+backward or one GISP step (to the first target), measured alone.

    CUDA: the allocator's peak in this process. CPU: a fresh subprocess, whose peak RSS (minus its RSS
    before the model was loaded) belongs to that work alone; RSS in a long process keeps freed pages.
    """
    device = torch.device(args.device)
    if device.type == "cuda" or args.memory_probe:
        dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        baseline = peak_rss_bytes()
        model, tokenizer, calibration, _ = load_setup(args, device, dtype)
        weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        with PeakMemory(model) as memory:
            if what == "bare":
                bare_forward_backward(model, calibration, args.batch_size)
            else:
                target = [float(args.targets.split(",")[0])]
                for _ in run_method(model, tokenizer, "gisp", target, gisp_options(args, 1), calibration, args.seed):
                    pass
        peak = memory.peak_bytes - (baseline if device.type == "cpu" else 0)
        return {"what": what, "peak_bytes": peak, "weights_bytes": weights, "peak_over_weights": peak / weights}
    cmd = [sys.executable, __file__, *sys.argv[1:], "--memory-probe", what]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def paired_timing(model, tokenizer, calibration: CalibrationSet, args: argparse.Namespace) -> dict:
    """GISP step time over bare forward+backward time, measured in alternating pairs.

    Alternating the two (after a warm-up of each) keeps a busy machine's drift out of the ratio; the
    reported ratio is the median of the pairs'. The GISP step is a whole ``steps=1`` run to the first
    target: gradients on the masked model, scores, ranking, masks.
    """
    target = [float(args.targets.split(",")[0])]

    def gisp_step() -> float:
        trajectory = Trajectory()
        for _ in run_method(
            model, tokenizer, "gisp", target, gisp_options(args, 1), calibration, args.seed, trajectory=trajectory
        ):
            pass
        return step_times(trajectory)[0]

    bare_forward_backward(model, calibration, args.batch_size)  # warm-up
    gisp_step()
    pairs = [(bare_forward_backward(model, calibration, args.batch_size), gisp_step()) for _ in range(args.bare_repeats)]
    ratios = [g / b for b, g in pairs]
    return {
        "bare_s": [b for b, _ in pairs],
        "gisp_step_s": [g for _, g in pairs],
        "step_over_bare": statistics.median(ratios),
        "step_over_bare_all": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args, args.memory_probe)))
        return 0
    steps_grid = [int(s) for s in args.steps.split(",") if s.strip()]
    targets = [float(t) for t in args.targets.split(",")]

    model, tokenizer, calibration, windows = load_setup(args, device, dtype)
    weights_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    results: dict = {
        "setup": {
            "model": f"synthetic-{args.synthetic_shape}-shape" if args.synthetic else args.model,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "dtype": str(dtype),
            "calibration": calibration.name,
            "calibration_tokens": calibration.num_tokens,
            "batch_size": args.batch_size,
            "gradient_checkpointing": args.gradient_checkpointing,
            "perplexity_on": None
            if windows is None
            else f"{args.eval_source} evaluation part, {windows.shape[0]} x {args.eval_seqlen}",
            "targets": targets,
            "weights_bytes": weights_bytes,
        },
        "runs": [],
    }
    print(json.dumps(results["setup"]), flush=True)
    if windows is not None:
        results["dense_ppl"] = perplexity(model, windows)
        print(f"dense perplexity {results['dense_ppl']:.2f}", flush=True)

    for steps in steps_grid:
        trajectory = Trajectory()
        ppl: dict[str, float] = {}
        started = time.perf_counter()
        for subnetwork in run_method(
            model, tokenizer, "gisp", targets, gisp_options(args, steps), calibration, args.seed, trajectory=trajectory
        ):
            if windows is not None:
                ppl[f"{subnetwork.target:.2f}"] = perplexity(model, windows)
        times = step_times(trajectory)
        run = {
            "steps": steps,
            "ppl": ppl,
            "sparsity": {f"{s['target']:.2f}": s["sparsity"] for s in trajectory.steps if s["target"] is not None},
            "step_times_s": times,
            "median_step_s": statistics.median(times),
            "wall_s": time.perf_counter() - started,
        }
        results["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "step_times_s"}), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))

    results["timing"] = paired_timing(model, tokenizer, calibration, args)
    print(json.dumps(results["timing"]), flush=True)
    del model
    results["memory"] = {what: memory_probe(args, what) for what in ("bare", "gisp")}
    print_table(results)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"saved {args.json}")
    return 0


def print_table(results: dict) -> None:
    setup = results["setup"]
    targets = [f"{t:.2f}" for t in setup["targets"]]
    print()
    print(f"GISP on {setup['model']} ({setup['device']}, {setup['dtype']}), calibration {setup['calibration']}")
    if results.get("dense_ppl"):
        print(f"perplexity on {setup['perplexity_on']}; dense {results['dense_ppl']:.2f}")
    header = ["steps"] + [f"ppl@{t}" for t in targets] + ["s/step", "run s"]
    print(" | ".join(f"{h:>10}" for h in header))
    for run in results["runs"]:
        cells = [str(run["steps"])] + [f"{run['ppl'][t]:.2f}" if t in run["ppl"] else "-" for t in targets]
        cells += [f"{run['median_step_s']:.2f}", f"{run['wall_s']:.0f}"]
        print(" | ".join(f"{c:>10}" for c in cells))
    timing = results["timing"]
    print(
        f"GISP step / bare forward+backward over the same tokens: {timing['step_over_bare']:.3f} "
        f"(median of {len(timing['step_over_bare_all'])} alternating pairs; bare {min(timing['bare_s']):.2f} s)"
    )
    memory = results["memory"]
    print(
        f"peak memory / weights: bare forward+backward {memory['bare']['peak_over_weights']:.2f}, "
        f"GISP step {memory['gisp']['peak_over_weights']:.2f} (weights {setup['weights_bytes'] / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
