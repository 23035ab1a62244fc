"""Peak memory of sequential calibration against model depth: it grows with one layer, not with the model.

For each depth (random Llama models of the same width, 4 to 32 layers) a fresh Python process builds
the model, then measures the resident-memory high-water mark above what it held before calibrating
(a thread samples ``/proc/self/statm`` every millisecond) while it

- ``sequential``: walks the layers with ``gisp_plugin.calibration.sequential.SequentialCalibration``
  (statistics of every ``o_proj`` / ``down_proj`` input, pruned-style propagation), or
- ``all_layers`` (the contrast): runs the calibration set through the model once, keeping every layer's
  hidden states, which is what scoring all layers from one cached pass would need.

The engine also reports the activation bytes it held at its peak (``engine_peak_mb``), which does not
depend on the allocator. One fresh process per measurement, so no run inherits another's heap.

    python benchmarks/calibration_memory.py                      # table
    python benchmarks/calibration_memory.py --json results.json  # table + JSON file
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gisp_plugin.harness.memory import PeakSampler, resident_bytes

MB = 2**20


def measure(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; returns a JSON-ready row."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gisp_plugin.calibration.sequential import SequentialCalibration
    from gisp_plugin.data.api import CalibrationSet

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seqlen, 128),
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    calibration = CalibrationSet(
        "random", [torch.randint(0, args.vocab, (args.seqlen,), generator=generator) for _ in range(args.samples)]
    )
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    one_layer = args.samples * args.seqlen * args.hidden * 4
    engine_peak = None
    with torch.no_grad():  # warm up: kernels, thread pools and allocator arenas are not calibration memory
        model(torch.stack(calibration.sequences[: args.batch_size]))
    before = resident_bytes()
    started = time.perf_counter()
    with PeakSampler() as sampler, torch.no_grad():
        if args.mode == "sequential":
            walk = SequentialCalibration(
                model,
                model.model.layers,
                calibration,
                ("self_attn.o_proj", "mlp.down_proj"),
                batch_size=args.batch_size,
                propagate="pruned",
                progress=False,
            )
            for _ in walk:
                pass
            engine_peak = walk.peak_bytes
        else:
            ids = torch.stack(calibration.sequences)
            kept = []
            for start in range(0, len(ids), args.batch_size):
                out = model.model(ids[start : start + args.batch_size], output_hidden_states=True, use_cache=False)
                kept.append(out.hidden_states)  # every layer's input, for every batch
    elapsed = time.perf_counter() - started
    return {
        "mode": args.mode,
        "layers": args.layers,
        "model_mb": round(model_bytes / MB, 1),
        "one_layer_activations_mb": round(one_layer / MB, 1),
        "peak_above_model_mb": round((sampler.peak - before) / MB, 1),
        "engine_peak_mb": None if engine_peak is None else round(engine_peak / MB, 1),
        "seconds": round(elapsed, 2),
    }


def run_fresh(args: argparse.Namespace, layers: int, mode: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--layers", str(layers), "--mode", mode]
    for name in ("hidden", "intermediate", "heads", "vocab", "samples", "seqlen", "batch_size", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    columns = ["mode", "layers", "model_mb", "one_layer_activations_mb", "peak_above_model_mb", "engine_peak_mb", "seconds"]
    cells = [columns] + [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="4,8,16,32", help="comma-separated numbers of layers (default 4,8,16,32)")
    parser.add_argument("--modes", default="sequential,all_layers", help="sequential and/or all_layers")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512, help="small, so embeddings do not dominate the model size")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="sequential", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"sequential", "all_layers"})
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; choose sequential, all_layers")
    rows = [run_fresh(args, int(depth), mode) for mode in modes for depth in args.depths.split(",")]
    print(table(rows))
    settings = {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "vocab", "samples", "seqlen", "batch_size")}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "calibration_memory", "settings": settings, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
