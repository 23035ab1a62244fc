"""Peak resident memory of a Wanda-sp run with the model in memory against layer-wise onloading from disk.

A randomly initialised model of a named shape (``benchmarks/shapes.py``) is saved to a folder; then each
mode runs in a fresh Python process, which records its resident memory after its imports and its peak
(``VmHWM`` of ``/proc/self/status``: the kernel's high-water mark, loading included; not ``ru_maxrss``,
which a child inherits from its parent at ``fork``) while it

- ``in_memory``: loads the whole model (``from_pretrained``) and prunes it with Wanda-sp (sequential), or
- ``disk``: builds the model with weightless decoder layers (``gisp_plugin.calibration.onloading.empty_model``)
  and prunes it with ``-o onload=disk``: each layer is read from the safetensors files for its turn only.

Both runs must choose the same structures (``same_masks``); the peak of the disk run should be about the
embeddings plus one or two layers plus the calibration activations, whatever the depth. The workers run
with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so a freed layer goes back to
the system at once, as the 30-200 MB tensors of a real 7B+ model do anyway; with the default dynamic
threshold, the small tensors of a small model are recycled inside the heap and the measured peak drifts
up by about a quarter of a layer per layer.

    python benchmarks/onloading_memory.py --shape smollm2                 # table
    python benchmarks/onloading_memory.py --shape mid-llama --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gisp_plugin.harness.memory import peak_rss_bytes, resident_bytes

MB = 2**20
MODES = ("in_memory", "disk")


def measure(args: argparse.Namespace) -> dict:
    """One run in this (fresh) process; returns a JSON-ready row."""
    import torch
    from transformers import AutoModelForCausalLM

    from gisp_plugin.calibration.onloading import empty_model
    from gisp_plugin.data.api import CalibrationSet
    from gisp_plugin.pruning import run_method

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    start = resident_bytes()
    started = time.perf_counter()
    if args.mode == "in_memory":
        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
        options = {}
    else:
        model = empty_model(args.folder)
        options = {"onload": "disk"}
    vocab = model.config.vocab_size
    calibration = CalibrationSet(
        "random", [torch.randint(0, vocab, (args.seqlen,), generator=generator) for _ in range(args.samples)]
    )
    (sub,) = run_method(model, None, "wanda_sp", [0.3], {**options, "batch_size": str(args.batch_size)}, calibration=calibration)
    elapsed = time.perf_counter() - started
    peak = peak_rss_bytes()
    masks = json.dumps(sub.keep.to_json(), sort_keys=True)
    return {
        "mode": args.mode,
        "peak_above_start_mb": round((peak - start) / MB, 1),
        "sparsity": round(sub.sparsity, 4),
        "masks_sha": hashlib.sha256(masks.encode()).hexdigest()[:16],
        "seconds": round(elapsed, 2),
    }


def worker_environment() -> dict[str, str]:
    """This process's environment with freed tensors of 64 KiB and more returned to the system at once."""
    import os

    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def run_fresh(args: argparse.Namespace, folder: Path, mode: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--mode", mode, "--folder", str(folder)]
    for name in ("samples", "seqlen", "batch_size", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=worker_environment())
    return json.loads(result.stdout.strip().splitlines()[-1])


def model_sizes(folder: Path) -> dict:
    """MB of the decoder layers (one, and all) and of everything else, from the saved files."""
    from safetensors import safe_open

    from gisp_plugin.calibration.onloading import checkpoint_index

    sizes: dict[str, int] = {}
    for name, file in checkpoint_index(folder).items():
        with safe_open(file, framework="pt") as handle:
            view = handle.get_slice(name)
            count = 1
            for dim in view.get_shape():
                count *= dim
            part = "layers" if ".layers." in name else "rest"
            sizes[part] = sizes.get(part, 0) + count * 4  # float32
    layers = len({name.split(".layers.")[1].split(".")[0] for name in checkpoint_index(folder) if ".layers." in name})
    return {
        "model_mb": round((sizes["layers"] + sizes["rest"]) / MB, 1),
        "one_layer_mb": round(sizes["layers"] / layers / MB, 1),
        "outside_layers_mb": round(sizes["rest"] / MB, 1),
        "layers": layers,
    }


def save_random(shape: str, folder: Path) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from shapes import random_model

    random_model(shape, "cpu", torch.float32).save_pretrained(folder)


def table(rows: list[dict], sizes: dict) -> str:
    columns = ["mode", "peak_above_start_mb", "sparsity", "masks_sha", "seconds"]
    cells = [columns] + [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in cells]
    described = ", ".join(f"{k} {v}" for k, v in sizes.items())
    return "\n".join([described, *lines])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2", help="a shape of benchmarks/shapes.py (default smollm2)")
    parser.add_argument("--folder", type=Path, default=None, help="a saved model folder to use instead of a random shape")
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="disk", choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def benchmark(args: argparse.Namespace, folder: Path) -> dict:
    """Both modes on one saved folder: sizes, rows, and whether the masks agree."""
    rows = [run_fresh(args, folder, mode) for mode in MODES]
    return {"sizes": model_sizes(folder), "rows": rows, "same_masks": len({r["masks_sha"] for r in rows}) == 1}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder
        if folder is None:
            folder = Path(scratch) / args.shape
            save_random(args.shape, folder)
        result = benchmark(args, folder)
    print(table(result["rows"], result["sizes"]))
    print(f"same masks: {result['same_masks']}")
    if args.json is not None:
        settings = {k: getattr(args, k) for k in ("shape", "samples", "seqlen", "batch_size")}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "onloading_memory", "settings": settings, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
