"""Dense vs compacted prefill speed and peak memory at several sparsities.

Prunes with ``magnitude`` (the speed of a compacted model depends on its shapes, not on the method),
compacts, and times a no-grad prefill of ``batch x seqlen`` tokens. The speedup is compared with the
parameter-count bound: (dense decoder + LM-head params) / (pruned decoder + LM-head params), the FLOP
ratio of the matrix products. On CPU each model is measured in a fresh subprocess so peak RSS belongs
to that model alone; on CUDA, with the allocator's peak statistics.

    python benchmarks/compaction.py --help
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from shapes import random_model
from transformers import AutoModelForCausalLM

from gisp_plugin.checkpoint.saving import load_pruned, save_pruned
from gisp_plugin.harness.memory import PeakMemory
from gisp_plugin.methods.api import NoOptions
from gisp_plugin.models.loading import load_model, parse_dtype
from gisp_plugin.pruning import compact_subnetwork, pruning_record, run_method


def lm_head_params(model: torch.nn.Module) -> int:
    return model.lm_head.weight.numel()


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up run."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, args: argparse.Namespace) -> dict:
    """Prefill and decode tokens/s, and the peak memory of the prefill (process peak on CPU, allocator peak on CUDA)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=generator).to(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad(), PeakMemory(model) as memory:
        prefill_s = median_seconds(lambda: model(ids, use_cache=False), args.repeats, device)
    result = {
        "tokens_per_s": args.batch * args.seqlen / prefill_s,
        "peak_memory_bytes": memory.peak_bytes,
        "weights_bytes": weights,
    }
    if args.decode_tokens:
        prompt = ids[:, :16]
        n = args.decode_tokens

        def decode():
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

        with torch.no_grad():
            result["decode_tokens_per_s"] = args.batch * n / median_seconds(decode, max(1, args.repeats // 2), device)
    return result


def measure_folder_in_subprocess(folder: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--measure-folder",
        str(folder),
        "--batch",
        str(args.batch),
        "--seqlen",
        str(args.seqlen),
        "--repeats",
        str(args.repeats),
        "--dtype",
        args.dtype,
        "--threads",
        str(torch.get_num_threads()),
        "--decode-tokens",
        str(args.decode_tokens),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def worker(args: argparse.Namespace) -> None:
    """Subprocess entry: load one saved model and print its measurement as JSON."""
    torch.set_num_threads(args.threads)
    folder = Path(args.measure_folder)
    dtype = parse_dtype(args.dtype)
    if (folder / "pruning.json").exists():
        model = load_pruned(folder, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    print(json.dumps(measure(model, args)))


def build_model(name: str, device: str, dtype: torch.dtype):
    if name.startswith("random-"):
        return random_model(name.removeprefix("random-"), device, dtype), None
    return load_model(name, device, dtype)


def benchmark_model(name: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    dtype = parse_dtype(args.dtype)
    model, tokenizer = build_model(name, args.device, dtype)
    on_cpu = args.device == "cpu"
    dense_compute = sum(p.numel() for p in model.model.layers.parameters()) + lm_head_params(model)
    rows = []
    dense_folder = workdir / f"{name}-dense"
    if on_cpu:
        model.save_pretrained(dense_folder)
        dense = measure_folder_in_subprocess(dense_folder, args)
    else:
        dense = measure(model, args)
    rows.append({"model": name, "target": 0.0, "sparsity": 0.0, "bound": 1.0, **dense})
    for subnetwork in run_method(model, tokenizer, "magnitude", args.sparsities):
        compact, params = compact_subnetwork(model, subnetwork, args.pad_to)
        bound = dense_compute / (params["decoder"] + lm_head_params(compact))
        if on_cpu:
            folder = workdir / f"{name}-{subnetwork.target:.2f}"
            record = pruning_record(name, "magnitude", NoOptions(), subnetwork, compact, params, None, 0)
            save_pruned(compact, tokenizer, folder, record)
            result = measure_folder_in_subprocess(folder, args)
        else:
            result = measure(compact, args)
        del compact
        rows.append(
            {
                "model": name,
                "target": subnetwork.target,
                "sparsity": 1 - params["decoder"] / params["decoder_dense"],
                "bound": bound,
                **result,
            }
        )
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / dense["tokens_per_s"]
        row["speedup_over_bound"] = row["speedup"] / row["bound"]
        if "decode_tokens_per_s" in row:
            row["decode_speedup"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\nPrefill, batch {args.batch} x {args.seqlen} tokens, {args.dtype}, {args.device}, MLP widths padded to x{args.pad_to}"
    )
    print(f"decode: {args.decode_tokens} new tokens after a 16-token prompt, batch {args.batch}")
    print(
        "| model | target | sparsity | prefill tok/s | speedup | param bound | speedup / bound | decode tok/s | decode speedup "
        "| weights MiB | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['target']:.2f} | {r['sparsity']:.3f} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
            f"{r['bound']:.2f}x | {r['speedup_over_bound']:.2f} | {r.get('decode_tokens_per_s', 0):.0f} | "
            f"{r.get('decode_speedup', 0):.2f}x | {r['weights_bytes'] / 2**20:.0f} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        default="smollm2-135m,random-mid-llama",
        help="comma list: smollm2-135m, a folder, or random-SHAPE (see shapes.py)",
    )
    parser.add_argument("--sparsities", default="0.2,0.3,0.4,0.5", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pad-to", type=int, default=1, help="round MLP widths up to a multiple (zero channels; 64 suits GPUs)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="new tokens for the decode measurement (0: skip)")
    parser.add_argument("--json", type=Path, default=Path("results/compaction.json"))
    parser.add_argument("--measure-folder", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.measure_folder:
        worker(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += benchmark_model(name, args, Path(tmp))
    print_table(rows, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "measure_folder", "threads")}
    args.json.write_text(json.dumps({"settings": settings, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
