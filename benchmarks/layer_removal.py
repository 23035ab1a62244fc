"""ShortGPT's cost in the default comparison: one-shot and iterative layer removal against Wanda-sp.

Each method prunes the same model to the same targets on the same calibration set, one after the other
in one process, and the table gives each one's wall time and its ratio to Wanda-sp's (the ratio is the
claim; absolute seconds depend on the machine's load), with the achieved sparsity and the removed layers.
Defaults are those of ``gisp compare`` with no arguments: SmolLM2-135M, 16 x 128 LAMBADA-novel tokens.

    python benchmarks/layer_removal.py --help
    python benchmarks/layer_removal.py --json results/layer_removal.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.models.loading import load_model
from gisp_plugin.pruning import run_method

RUNS = (("shortgpt", {}), ("shortgpt", {"iterative": "true"}), ("wanda_sp", {}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    p.add_argument("--targets", default="0.2,0.4", help="sparsity targets (default 0.2,0.4, as gisp compare)")
    p.add_argument("--calibration", default="lambada-novels", help="calibration source (default lambada-novels)")
    p.add_argument("--n-samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    targets = [float(t) for t in args.targets.split(",")]
    model, tokenizer = load_model(args.model)
    calibration = load_calibration(CalibrationRequest(args.calibration, args.n_samples, args.seqlen, 0), tokenizer)
    rows = []
    for method, options in RUNS:
        started = time.perf_counter()
        subnetworks = list(run_method(model, tokenizer, method, targets, options, calibration=calibration))
        seconds = time.perf_counter() - started
        reached = [round(s.sparsity, 4) for s in subnetworks]
        removed = [s.info.get("removed_layers") for s in subnetworks]
        rows.append({"method": method, "options": options, "seconds": seconds, "sparsity": reached, "removed_layers": removed})
    baseline = next(row["seconds"] for row in rows if row["method"] == "wanda_sp")
    print(f"{args.model}, {args.n_samples} x {args.seqlen} tokens of {args.calibration}, targets {targets}")
    print("| method | options | seconds | / wanda_sp | sparsity reached | removed layers |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        row["ratio_to_wanda_sp"] = row["seconds"] / baseline
        options = ",".join(f"{k}={v}" for k, v in row["options"].items()) or "-"
        removed = "; ".join(str(r) for r in row["removed_layers"] if r is not None) or "-"
        seconds, ratio = f"{row['seconds']:.1f}", f"{row['ratio_to_wanda_sp']:.2f}"
        cells = [row["method"], options, seconds, ratio, str(row["sparsity"]), removed]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
