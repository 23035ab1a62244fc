"""Prune, then quantise: quality, size on disk and speed of SmolLM2-135M, dense and GISP 30/50%.

Every model is measured the same way: perplexity on held-apart text (``boolq-wiki``, never used for
calibration), the bytes of its saved safetensors weights, and prefill and decode tokens/s (median of
``--repeats`` runs after a warm-up, no gradients). Ratios are to the unquantised dense model.

- CPU (float32): each of dense, GISP 30% and GISP 50% unquantised, ``int8wo`` and ``int8dq``.
- CUDA (bfloat16): the same models unquantised, ``int8wo``, ``int4wo`` and ``fp8dq`` (where the GPU has it),
  compacted with MLP widths padded to multiples of 64 (``--pad-to``). GPU rows print only when CUDA is there.

GISP runs once (its nested trajectory gives both targets) with ``steps`` and calibration kept small so the
whole benchmark finishes in minutes on two CPU cores.

    python benchmarks/deploy.py --help
    python benchmarks/deploy.py                       # CPU table, results/deploy-cpu.json
"""

from __future__ import annotations

from gisp_plugin.deploy.import_noise import quiet_torchao_import

quiet_torchao_import()  # before transformers imports torchao

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from compaction import measure  # noqa: E402  (prefill and decode tokens/s, shared with the compaction benchmark)

from gisp_plugin.checkpoint.saving import save_pruned  # noqa: E402
from gisp_plugin.data.api import CalibrationRequest  # noqa: E402
from gisp_plugin.data.loading import load_calibration  # noqa: E402
from gisp_plugin.deploy.padding import default_pad_to  # noqa: E402
from gisp_plugin.deploy.quantize import check_quantization, quantization_info, quantized_copy, runnable_choices  # noqa: E402
from gisp_plugin.deploy.size import weights_bytes  # noqa: E402
from gisp_plugin.evaluation.specs import evaluate  # noqa: E402
from gisp_plugin.models.loading import load_model  # noqa: E402
from gisp_plugin.pruning import compact_subnetwork, pruning_record, resolve_method, run_method  # noqa: E402

log = logging.getLogger("deploy")

CPU_QUANTS = ("int8wo", "int8dq")
GPU_QUANTS = ("int8wo", "int4wo", "fp8dq")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", default="0.3,0.5", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--quants", default=None, help="comma list (default: int8wo,int8dq on CPU; int8wo,int4wo,fp8dq on CUDA)")
    parser.add_argument("--pad-to", type=int, default=None, help="MLP width multiple (default: 64 on CUDA, 1 on CPU)")
    parser.add_argument("--steps", default="4", help="GISP steps")
    parser.add_argument("--calibration", default="lambada-novels")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128, help="calibration tokens per sequence")
    parser.add_argument("--eval", default="perplexity:source=boolq-wiki,seqlen=128,max_windows=16", help="held-apart text")
    parser.add_argument("--batch", type=int, default=1, help="prefill/decode batch")
    parser.add_argument("--prefill-len", type=int, default=128, help="prefill tokens per sequence")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="default: results/deploy-<device>.json")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.pad_to = default_pad_to(args.device, args.pad_to)
    wanted = args.quants.split(",") if args.quants else (GPU_QUANTS if on_cuda else CPU_QUANTS)
    args.quants = [q for q in wanted if q.partition(":")[0] in runnable_choices(args.device)]
    for skipped in sorted(set(wanted) - set(args.quants)):
        log.warning("skipping %s: this device runs %s", skipped, ", ".join(runnable_choices(args.device)))
    for quant in args.quants:
        check_quantization(quant, args.device, args.dtype)
    args.json = args.json or Path(f"results/deploy-{torch.device(args.device).type}.json")
    return args


def measure_row(name: str, target: float, quant: str, model, tokenizer, folder: Path, args: argparse.Namespace) -> dict:
    """Perplexity, size on disk and speed of one saved model."""
    started = time.perf_counter()
    (result,) = evaluate(model, tokenizer, [args.eval]).values()
    (ppl,) = (value for key, value in result.metrics.items() if key.startswith("ppl["))  # not its ppl_stderr
    timing = argparse.Namespace(batch=args.batch, seqlen=args.prefill_len, repeats=args.repeats, decode_tokens=args.decode_tokens)
    speed = measure(model, timing)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    size = weights_bytes(folder)
    row = {
        "model": name,
        "target": target,
        "quant": quant,
        "params": params,
        "perplexity": ppl,
        "size_bytes": size,
        "bytes_per_param": size / params,
        "prefill_tokens_per_s": speed["tokens_per_s"],
        "decode_tokens_per_s": speed["decode_tokens_per_s"],
    }
    log.info(
        "%s %s: %s (%.0f s)",
        name,
        quant,
        json.dumps({k: row[k] for k in ("perplexity", "size_bytes")}),
        time.perf_counter() - started,
    )
    return row


def variants(model, quants: list[str]):
    """``(quant label, model)``: the model itself, then one quantised copy per choice."""
    yield "none", model
    for quant in quants:
        choice = check_quantization(quant, next(model.parameters()).device, next(model.parameters()).dtype)
        yield choice.label, quantized_copy(model, choice)


def run(args: argparse.Namespace, workdir: Path) -> list[dict]:
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    rows = []
    for quant, variant in variants(model, args.quants):
        folder = workdir / f"dense-{quant}"
        variant.save_pretrained(folder)
        rows.append(measure_row("dense", 0.0, quant, variant, tokenizer, folder, args))
        del variant
    options = {"steps": args.steps}
    _, parsed = resolve_method("gisp", options)
    request = CalibrationRequest(args.calibration, args.n_samples, args.seqlen, args.seed)
    calibration = load_calibration(request, tokenizer)
    started = time.perf_counter()
    subnetworks = list(run_method(model, tokenizer, "gisp", args.sparsities, options, calibration, args.seed))
    log.info("GISP to %s in %.0f s", args.sparsities, time.perf_counter() - started)
    for subnetwork in subnetworks:
        compact, params = compact_subnetwork(model, subnetwork, args.pad_to)
        base_info = dict(subnetwork.info, pad_to=args.pad_to)
        for quant, variant in variants(compact, args.quants):
            subnetwork.info = dict(base_info)
            if quant != "none":
                subnetwork.info["quantization"] = quantization_info(check_quantization(quant, args.device, args.dtype))
            record = pruning_record(args.model, "gisp", parsed, subnetwork, variant, params, request.label, args.seed)
            folder = save_pruned(variant, tokenizer, workdir / f"gisp-{subnetwork.target:.2f}-{quant}", record)
            row = measure_row("gisp", subnetwork.target, quant, variant, tokenizer, folder, args)
            row["sparsity"] = record.sparsity
            rows.append(row)
            del variant
        del compact
    dense = rows[0]
    for row in rows:
        row.setdefault("sparsity", 0.0)
        row["perplexity_ratio"] = row["perplexity"] / dense["perplexity"]
        row["size_ratio"] = row["size_bytes"] / dense["size_bytes"]
        row["prefill_speedup"] = row["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    return rows


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{args.model}, {args.dtype} on {args.device} ({torch.get_num_threads()} threads), MLP widths padded to x{args.pad_to}; "
        f"GISP steps={args.steps}, calibration {args.calibration} {args.n_samples}x{args.seqlen}; perplexity: {args.eval}; "
        f"prefill batch {args.batch} x {args.prefill_len} tokens, decode {args.decode_tokens} new tokens after 16; "
        f"ratios to the unquantised dense model",
        "",
        "| model | quant | sparsity | perplexity | ppl ratio | size MiB | size ratio | bytes/param "
        "| prefill tok/s | prefill ratio | decode tok/s | decode ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = "dense" if r["model"] == "dense" else f"GISP {r['target']:.0%}"
        lines.append(
            f"| {name} | {r['quant']} | {r['sparsity']:.3f} | {r['perplexity']:.2f} | {r['perplexity_ratio']:.2f}x | "
            f"{r['size_bytes'] / 2**20:.0f} | {r['size_ratio']:.2f}x | {r['bytes_per_param']:.2f} | "
            f"{r['prefill_tokens_per_s']:.0f} | {r['prefill_speedup']:.2f}x | {r['decode_tokens_per_s']:.1f} | "
            f"{r['decode_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gisp-deploy-") as tmp:
        rows = run(args, Path(tmp))
    text = table(rows, args)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"settings": settings, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    args.json.write_text(json.dumps(payload, indent=1))
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
