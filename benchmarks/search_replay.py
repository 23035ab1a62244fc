"""The perplexity search with and without prefix replay: time, and equal choices.

SLEB and BlockPruner measure every candidate of a step from its first decoder layer on, the layers below
replaying one recorded pass (``prefix_replay``, the default; ``gisp_baselines/perplexity_search.py``).
This script runs each method to ``--target`` both ways on the same model and calibration,
in turns (replay, full, replay, full, ...) so that load on a shared machine falls on both sides of the
ratio, checks that both ways remove the same blocks with the same perplexities, and prints the times and
their ratio (the same search steps both ways). Defaults: SmolLM2-135M and the quality study's calibration
(32 x 128 LAMBADA).

    python benchmarks/search_replay.py --json results/search_replay.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.models.loading import load_model
from gisp_plugin.pruning import run_method

REMOVED = {"sleb": "removed_layer", "blockpruner": "removed_block"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    p.add_argument("--methods", default="sleb,blockpruner", help="methods (default sleb,blockpruner)")
    p.add_argument("--target", type=float, default=0.03, help="sparsity searched for (default 0.03: one SmolLM2 layer)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each way (default 1)")
    p.add_argument("--calibration", default="lambada-novels", help="calibration source (default lambada-novels)")
    p.add_argument("--n-samples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--json", type=Path, help="write the table here as JSON")
    return p.parse_args(argv)


def search(model, tokenizer, calibration, method: str, target: float, replay: bool) -> tuple[float, list[dict]]:
    """Seconds for the search of ``method`` to ``target``, and its trajectory steps."""
    trajectory = Trajectory()
    start = time.perf_counter()
    list(run_method(model, tokenizer, method, [target], {"prefix_replay": replay}, calibration, trajectory=trajectory))
    return time.perf_counter() - start, trajectory.steps


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer = load_model(args.model)
    calibration = load_calibration(CalibrationRequest(args.calibration, args.n_samples, args.seqlen, 0), tokenizer)
    rows = []
    for method in args.methods.split(","):
        times: dict[bool, list[float]] = {True: [], False: []}
        steps: dict[bool, list[dict]] = {}
        for _ in range(args.repeats):
            for replay in (True, False):
                seconds, steps[replay] = search(model, tokenizer, calibration, method, args.target, replay)
                times[replay].append(seconds)
        same = [s[REMOVED[method]] for s in steps[True]] == [s[REMOVED[method]] for s in steps[False]]
        worst = max(
            abs(a - b) / b
            for x, y in zip(steps[True], steps[False], strict=True)
            for a, b in zip(x["tried"].values(), y["tried"].values(), strict=True)
        )
        rows.append(
            {
                "method": method,
                "removals": len(steps[True]),
                "seconds_replay": min(times[True]),
                "seconds_full": min(times[False]),
                "ratio": min(times[True]) / min(times[False]),
                "same_choices": same,
                "max_rel_perplexity_difference": worst,
            }
        )
    print("| method | removals | seconds, replay | seconds, full passes | ratio | same choices | max rel. ppl diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['removals']} | {r['seconds_replay']:.1f} | {r['seconds_full']:.1f} | "
            f"{r['ratio']:.2f} | {r['same_choices']} | {r['max_rel_perplexity_difference']:.1e} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
