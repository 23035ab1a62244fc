"""What pruning for an engine costs: GISP's perplexity under each ``--shape`` at the same sparsity.

One GISP run per row prunes SmolLM2-135M to every target (nested subnetworks); each compacted model's
perplexity is measured on the held-apart text ``gisp compare`` uses by default. A row's cost is its
perplexity over the ``free`` row with the same protected layers. ``uniform`` gives every layer the same
shape, so GISP's reference protection (layers 0-2 and 29 never pruned) would keep every layer whole: the
default rows all run with ``protect=none`` (``--rows free,even-groups`` adds rows with the reference
protection).

SmolLM2-135M: 30 layers, 9 query heads reading 3 key/value heads (groups of 3), hidden 576, MLP 1536.
Defaults are cut down to fit 2 busy CPU cores: ``steps=2``, 16 x 128 LAMBADA-novel tokens for
calibration, perplexity on 12 x 128-token windows of the BoolQ Wikipedia passages (``gisp compare``'s
default text, half its windows).

    python benchmarks/shape_cost.py --json results/shape_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.evaluation.specs import parse_eval_specs, run_spec
from gisp_plugin.models.loading import load_model
from gisp_plugin.pruning import compact_subnetwork, run_method

ROWS = ("free:none", "even-groups:none", "kv-groups:none", "uniform:none")  # shape[:protect]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    p.add_argument("--targets", default="0.2,0.4", help="sparsity targets (default 0.2,0.4)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"shape[:protect] rows (default {','.join(ROWS)})")
    p.add_argument("--steps", type=int, default=2, help="GISP gradient steps (default 2)")
    p.add_argument("--calibration", default="lambada-novels", help="calibration source (default lambada-novels)")
    p.add_argument("--n-samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--eval", default="perplexity:source=boolq-wiki,seqlen=128,max_windows=12", help="evaluation spec")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=Path("results/shape_cost.json"), help="where to save the results")
    return p.parse_args(argv)


def kept_shapes(anatomy, keep) -> dict[str, list]:
    """Per layer: query heads kept in each key/value group (``"3+2+0"``) and the MLP width."""
    heads, widths = [], []
    for layer in anatomy.layers:
        for name, kind in layer.kinds.items():
            flags = keep[layer.index, name]
            if kind.block == "attention":
                cells = kind.dependents[0].readers if kind.dependents else tuple((u,) for u in range(kind.count))
                heads.append("+".join(str(int(flags[list(cell)].sum())) for cell in cells))
            else:
                widths.append(int(flags.sum()))
    return {"attention": heads, "mlp": widths}


def describe(kept: dict[str, list]) -> tuple[str, str]:
    """Table cells: the distinct attention layouts (most common first) and the MLP width range."""
    layouts = sorted(set(kept["attention"]), key=lambda h: (-kept["attention"].count(h), h))
    attention = ", ".join(layouts[:3]) + (f" (+{len(layouts) - 3} more)" if len(layouts) > 3 else "")
    low, high = min(kept["mlp"]), max(kept["mlp"])
    return attention, str(low) if low == high else f"{low}..{high}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    (spec,) = parse_eval_specs([args.eval])
    model, tokenizer = load_model(args.model)
    anatomy = adapter_for(model).anatomy(model)
    calibration = load_calibration(CalibrationRequest(args.calibration, args.n_samples, args.seqlen, 0), tokenizer)
    started = time.perf_counter()
    dense = next(iter(run_spec(spec, model, tokenizer).metrics.values()))
    rows = []
    for row in args.rows.split(","):
        shape, _, protect = row.partition(":")
        options = {"steps": args.steps, "protect": protect or "reference"}
        began = time.perf_counter()
        for subnetwork in run_method(model, tokenizer, "gisp", targets, options, calibration, shape=shape):
            compact, params = compact_subnetwork(model, subnetwork)
            ppl = next(iter(run_spec(spec, compact, tokenizer).metrics.values()))
            rows.append(
                {
                    "shape": shape,
                    "protect": options["protect"],
                    "target": subnetwork.target,
                    "sparsity": 1 - params["decoder"] / params["decoder_dense"],
                    "ppl": ppl,
                    "kept": kept_shapes(anatomy, subnetwork.keep),
                    "prune_s": time.perf_counter() - began,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        base = next(r for r in rows if r["shape"] == "free" and r["protect"] == row["protect"] and r["target"] == row["target"])
        row["ppl_vs_free"] = row["ppl"] / base["ppl"]
    print(f"\ndense perplexity {dense:.2f} ({spec.text})\n")
    print("| shape | protect | target | sparsity | perplexity | x free | heads per kv group, per layer | MLP width |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        heads, mlp = describe(r["kept"])
        print(
            f"| {r['shape']} | {r['protect']} | {r['target']:.2f} | {r['sparsity']:.4f} | {r['ppl']:.2f} "
            f"| {r['ppl_vs_free']:.3f} | {heads} | {mlp} |"
        )
    result = {
        "model": args.model,
        "method": "gisp",
        "steps": args.steps,
        "calibration": calibration.name,
        "eval": spec.text,
        "dense_ppl": dense,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "command": "python benchmarks/shape_cost.py " + " ".join(argv or []),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\nsaved {args.json} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
