"""Memory per rank and time per GISP step: one process against FSDP over 2 ranks, beside the memory model.

A random Llama (``benchmarks/shapes.py``, shape ``fsdp-llama`` by default: 24 layers, hidden 1024, GQA,
0.33 B parameters) is saved once as safetensors. Then, each in fresh processes:

- ``N=1``: one process loads it (``load_model``) and runs one GISP step (``run_method``, ``steps=1``);
- ``N=2 fsdp``: ``torchrun --nproc-per-node 2`` ranks (gloo, CPU) each load their shard
  (``load_sharded_model``) and run the same step on their half of the calibration data.

Each rank reports: the tensor bytes it holds of the weights and of the float32 gradient sums (the
``accounted`` memory, independent of the allocator), the peak resident memory during the step above
what the process held before loading the model (libraries imported and process group joined; a thread
samples ``/proc/self/statm``), and the step's wall time. Beside each, ``gisp plan``'s prediction
(``gisp_plugin.distributed.memory_model``) for the same shape, ranks, dtype and micro-batch. Rows with
checkpointing recompute each layer in backward (``gradient_checkpointing=True``).

    python benchmarks/distributed.py                                  # table
    python benchmarks/distributed.py --json distributed.json      # table + JSON file
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gisp_plugin.harness.memory import PeakSampler, resident_bytes

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def save_model(shape: str, folder: Path) -> None:
    """Save a random model of ``shape`` (float32) with a tiny tokenizer, once."""
    if (folder / "config.json").exists():
        return
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from shapes import random_model

    from tests.tiny import tiny_tokenizer

    random_model(shape, "cpu", torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def calibration(samples: int, seqlen: int, vocab: int):
    import torch

    from gisp_plugin.data.api import CalibrationSet

    generator = torch.Generator().manual_seed(0)
    return CalibrationSet("random", [torch.randint(3, vocab, (seqlen,), generator=generator) for _ in range(samples)])


def worker(args: argparse.Namespace) -> None:
    """One process (or one rank): load, run one GISP step, report its measurements as one JSON line."""
    import torch
    import torch.distributed as dist

    from gisp_plugin.adapters.api import adapter_for
    from gisp_plugin.distributed.context import init_distributed
    from gisp_plugin.distributed.fsdp import local_bytes
    from gisp_plugin.importance.gradients import weight_paths, weight_tensor
    from gisp_plugin.pruning import run_method

    torch.set_num_threads(1)
    setup = init_distributed("cpu", fsdp=args.fsdp)
    before = resident_bytes()  # libraries imported, process group joined: what a process holds without a model
    if args.fsdp:
        from gisp_plugin.distributed.sharded_loading import load_sharded_model

        model, tokenizer = load_sharded_model(str(args.folder), "cpu", "float32", setup)
    else:
        from gisp_plugin.models.loading import load_model

        model, tokenizer = load_model(str(args.folder))
    loaded = resident_bytes()
    anatomy = adapter_for(model).anatomy(model)
    summed = [weight_tensor(model, path) for path in weight_paths(anatomy)]  # the engine sums these in float32
    options = {"steps": 1, "batch_size": args.batch_size, "gradient_checkpointing": args.gradient_checkpointing}
    data = calibration(args.samples, args.seqlen, model.config.vocab_size)
    with PeakSampler(interval=0.005) as sampler:
        started = time.perf_counter()
        subnetworks = list(run_method(model, tokenizer, "gisp", [0.2], options, calibration=data))
        elapsed = time.perf_counter() - started
    row = {
        "rank": setup.rank,
        "weights_bytes": local_bytes(p for p in {id(p): p for p in model.parameters()}.values()),
        "sums_bytes": local_bytes(iter(summed)) // summed[0].element_size() * 4,
        "rss_before_load_mb": before / MB,
        "rss_loaded_mb": loaded / MB,
        "rss_step_peak_mb": sampler.peak / MB,
        "rss_after_step_mb": resident_bytes() / MB,
        "step_s": elapsed,
        "sparsity": subnetworks[0].sparsity,
    }
    rows = [row]
    if setup.enabled:
        rows = [None] * setup.world_size
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    if setup.is_main:
        print(json.dumps(rows))


def run_config(args: argparse.Namespace, nproc: int, checkpointing: bool) -> list[dict]:
    """Measure one configuration in fresh processes; the ranks' rows."""
    script = [str(Path(__file__).resolve()), "--worker", "--folder", str(args.folder)]
    script += ["--samples", str(args.samples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)]
    script += ["--gradient-checkpointing"] if checkpointing else []
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script, "--fsdp"]
    else:
        command = [sys.executable, *script]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'baselines'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict(args: argparse.Namespace, nproc: int, checkpointing: bool) -> dict:
    from gisp_plugin.distributed.memory_model import plan_memory

    plan = plan_memory(str(args.folder / "config.json"), nproc, nproc > 1, "float32", args.batch_size, args.seqlen)
    total = plan.device_total_checkpointed if checkpointing else plan.device_total
    return {"weights_bytes": plan.weights, "sums_bytes": plan.gradient_sums, "step_bytes": total, "plan": plan.to_json()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="fsdp-llama", help="a shape of benchmarks/shapes.py (default fsdp-llama)")
    parser.add_argument("--samples", type=int, default=4, help="calibration sequences (default 4)")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per micro-batch (default 2)")
    parser.add_argument("--folder", type=Path, default=None, help="where the random model is saved (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path[:0] = [str(ROOT), str(ROOT / "baselines")]
    with tempfile.TemporaryDirectory() as scratch:
        args.folder = args.folder or Path(scratch) / args.shape
        save_model(args.shape, args.folder)
        rows = []
        for nproc, checkpointing in ((1, False), (2, False), (1, True), (2, True)):
            measured = run_config(args, nproc, checkpointing)
            predicted = predict(args, nproc, checkpointing)
            for rank_row in measured:
                step_mb = rank_row["rss_step_peak_mb"] - rank_row["rss_before_load_mb"]
                rows.append(
                    {
                        "nproc": nproc,
                        "fsdp": nproc > 1,
                        "gradient_checkpointing": checkpointing,
                        **rank_row,
                        "step_above_start_mb": step_mb,
                        "predicted_weights_mb": predicted["weights_bytes"] / MB,
                        "predicted_sums_mb": predicted["sums_bytes"] / MB,
                        "predicted_step_mb": predicted["step_bytes"] / MB,
                    }
                )
            print(f"measured N={nproc} checkpointing={checkpointing}", file=sys.stderr)
    print_table(rows)
    if args.json is not None:
        skip = ("worker", "fsdp", "folder")
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip}
        settings["cpu_count"] = os.cpu_count()
        settings["load_average"] = os.getloadavg()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "distributed", "settings": settings, "rows": rows}, indent=1))


def print_table(rows: list[dict]) -> None:
    one = {(r["gradient_checkpointing"]): r for r in rows if r["nproc"] == 1}
    header = (
        f"{'N':>2} {'ckpt':>5} {'rank':>4} | {'weights+sums MB':>15} {'pred':>7} {'/ N=1':>6} | "
        f"{'step peak MB':>12} {'pred':>7} {'/ N=1':>6} | {'step s':>7} {'/ N=1':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        base = one[r["gradient_checkpointing"]]
        accounted = (r["weights_bytes"] + r["sums_bytes"]) / MB
        base_accounted = (base["weights_bytes"] + base["sums_bytes"]) / MB
        print(
            f"{r['nproc']:>2} {('yes' if r['gradient_checkpointing'] else 'no'):>5} {r['rank']:>4} | "
            f"{accounted:>15.0f} {r['predicted_weights_mb'] + r['predicted_sums_mb']:>7.0f} {accounted / base_accounted:>6.2f} | "
            f"{r['step_above_start_mb']:>12.0f} {r['predicted_step_mb']:>7.0f} "
            f"{r['step_above_start_mb'] / base['step_above_start_mb']:>6.2f} | "
            f"{r['step_s']:>7.1f} {r['step_s'] / base['step_s']:>6.2f}"
        )


if __name__ == "__main__":
    main()
