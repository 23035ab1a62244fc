"""Pruned models served by llama.cpp: perplexity beside the project's own evaluator, speed, file size.

For the dense model and each method x target x shape, the script prunes SmolLM2-135M, compacts, exports a
float32 GGUF (architecture deci) and runs it in llama.cpp (llama-cpp-python, CPU):

- perplexity in llama.cpp on the held-apart text, on the very token windows the project's evaluator uses
  (``perplexity:source=boolq-wiki,seqlen=128``, the default comparison's), beside that evaluator's number;
- prefill tokens/s (one batch of ``--prefill`` tokens) and decode tokens/s (``--decode`` tokens one at a time
  through the cache), the best of ``--repeats`` runs, timed after all pruning, each model in turns with the
  dense one (dense, model, dense, model, ...) so that load on a shared machine falls on both sides of a ratio;
- speed-up over dense and its ratio to the parameter bound: the dense model's matrix parameters per token
  (decoder plus LM head) over the exported model's (what llama.cpp executes, padding included);
- the GGUF file size.

Timings are ratios measured in one run (the machines are shared and noisy); the perplexities are exact
numbers. Shapes other than ``free`` need the ``--shape`` allocation constraint (``gisp prune --shape``).

    python benchmarks/export.py --help
    python benchmarks/export.py --json results/export.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gisp_plugin.checkpoint.saving import PruningRecord, count_params, save_pruned
from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.evaluation.perplexity import evaluation_text, ppl_with_stderr, text_windows, window_nlls
from gisp_plugin.export.api import ExportOptions
from gisp_plugin.export.native import saved_form
from gisp_plugin.export.run import export_folder
from gisp_plugin.models.loading import load_model
from gisp_plugin.pruning import compact_subnetwork, run_method

METHODS = {"gisp": {"steps": "4"}, "wanda_sp": {}, "shortgpt": {}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or folder (default: smollm2-135m)")
    p.add_argument("--methods", default=",".join(METHODS), help="methods (default gisp,wanda_sp,shortgpt; gisp with steps=4)")
    p.add_argument("--targets", default="0.2,0.4", help="sparsity targets (default 0.2,0.4)")
    p.add_argument("--shapes", default="free", help="allocation shapes, e.g. free,even-groups (default free)")
    p.add_argument(
        "--groupings", default="auto", help="ways to even uneven key/value groups, each exported and measured (default auto)"
    )
    p.add_argument(
        "--pad-to", type=int, default=1, help="round MLP widths up with zero channels, as gisp prune --pad-to (default 1: none)"
    )
    p.add_argument("--calibration", default="lambada-novels", help="calibration source (default lambada-novels)")
    p.add_argument("--n-samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration and evaluation window (default 128)")
    p.add_argument("--eval-source", default="boolq-wiki", help="held-apart text for perplexity (default boolq-wiki)")
    p.add_argument("--max-windows", type=int, default=24, help="evaluation windows (default 24, as gisp compare)")
    p.add_argument("--prefill", type=int, default=256, help="prefill batch in tokens (default 256)")
    p.add_argument("--decode", type=int, default=64, help="decoded tokens (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats, best kept (default 3)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def _llama(path: Path, n_ctx: int, threads: int):
    import llama_cpp

    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(
        str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, type_k=f32, type_v=f32, n_threads=threads
    )


def llama_perplexity(path: Path, windows: torch.Tensor, threads: int) -> tuple[float, float]:
    """Perplexity and its standard error in llama.cpp over the same windows (each evaluated from an empty cache)."""
    model = _llama(path, windows.shape[1], threads)
    nlls = []
    for window in windows.tolist():
        model.reset()
        model.eval(window)
        logits = torch.tensor(np.array(model.scores[: len(window) - 1]), dtype=torch.float64)
        nlls.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum")))
    model.close()
    ppl, _, stderr = ppl_with_stderr(torch.tensor(nlls), windows.shape[1] - 1)
    return ppl, stderr


def _speed_once(model, ids: list[int], decode: int) -> tuple[float, float]:
    """Prefill tokens/s (one batch) and decode tokens/s (one token at a time through the cache), from an empty cache."""
    model.reset()
    started = time.perf_counter()
    model.eval(ids)
    prefill = len(ids) / (time.perf_counter() - started)
    started = time.perf_counter()
    for step in range(decode):
        model.eval([ids[step % len(ids)]])
    return prefill, decode / (time.perf_counter() - started)


def paired_speed(dense: Path, path: Path, prefill: int, decode: int, repeats: int, threads: int) -> dict[str, float]:
    """Best tokens/s of the dense and the exported model, timed in turns (dense, model, dense, ...).

    The two are measured alternately, ``repeats`` times each, so a change of load on a shared machine falls
    on both: the ratio of their best times is the speed-up, not an artefact of when each was measured.
    """
    ids = torch.randint(3, 1000, (prefill,), generator=torch.Generator().manual_seed(0)).tolist()
    models = {"dense": _llama(dense, prefill + decode, threads), "model": _llama(path, prefill + decode, threads)}
    best = {name: [0.0, 0.0] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            best[name] = [max(old, new) for old, new in zip(best[name], _speed_once(model, ids, decode), strict=True)]
    for model in models.values():
        model.close()
    return {
        "prefill_tok_s": best["model"][0],
        "decode_tok_s": best["model"][1],
        "prefill_speedup": best["model"][0] / best["dense"][0],
        "decode_speedup": best["model"][1] / best["dense"][1],
    }


def matrix_params(report, model) -> int:
    """Parameters llama.cpp multiplies per token: the exported decoder plus the LM head."""
    return report.executed_params + model.get_output_embeddings().weight.numel()


def measure(name: str, model, tokenizer, record, windows, args, work: Path) -> list[dict]:
    """One row per grouping (one only where every layer's groups are already even, so the file is the same)."""
    folder = save_pruned(model, tokenizer, work / name, record)
    nlls = window_nlls(model, windows)
    ppl, _, stderr = ppl_with_stderr(nlls, windows.shape[1] - 1)
    rows = []
    for grouping in args.groupings.split(","):
        report = export_folder(folder, "gguf", work / f"{name}-{grouping}.gguf", ExportOptions(grouping=grouping))
        rows.append(_llama_row(f"{name} ({grouping})", report, model, ppl, stderr, record, windows, args))
        if not any("uneven" in note for note in report.padding):
            break
    return rows


def _llama_row(name: str, report, model, ppl: float, stderr: float, record, windows, args) -> dict:
    llama_ppl, llama_stderr = llama_perplexity(report.path, windows, args.threads)
    row = {
        "model": name,
        "ppl_project": ppl,
        "ppl_project_stderr": stderr,
        "ppl_llama_cpp": llama_ppl,
        "ppl_llama_cpp_stderr": llama_stderr,
        "ppl_relative_difference": abs(llama_ppl - ppl) / ppl,
        "gguf": str(report.path),
        "matrix_params": matrix_params(report, model),
        "executed_over_compacted": report.overhead,
        "padding": report.padding,
        "gguf_mib": report.path.stat().st_size / 2**20,
        "saved_form": record.info.get("saved_form", {}).get("form", "dense"),
    }
    logging.getLogger(__name__).warning("%s: %s", name, json.dumps({k: v for k, v in row.items() if k != "padding"}))
    return row


def time_rows(rows: list[dict], args) -> None:
    """Speed of every exported model beside the dense one, after all pruning (so nothing else runs meanwhile)."""
    dense = Path(rows[0]["gguf"])
    for row in tqdm(rows, desc="timing", unit="model"):
        row.update(paired_speed(dense, Path(row["gguf"]), args.prefill, args.decode, args.repeats, args.threads))


def _record(args, method: str, options: dict, subnetwork, compact, params, form) -> PruningRecord:
    return PruningRecord(
        base_model=args.model,
        method=method,
        options=options,
        target=subnetwork.target,
        sparsity=1 - params["decoder"] / params["decoder_dense"],
        params=params,
        layers=[],
        pruned_structures=subnetwork.keep.to_json(),
        info={"saved_form": form},
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    targets = [float(t) for t in args.targets.split(",")]
    shapes = [s for s in args.shapes.split(",") if s]
    if shapes != ["free"] and "shape" not in inspect.signature(run_method).parameters:
        raise SystemExit(
            "shapes other than free need run_method(..., shape=...): the allocation constraint of gisp prune --shape"
        )
    model, tokenizer = load_model(args.model)
    calibration = load_calibration(CalibrationRequest(args.calibration, args.n_samples, args.seqlen, 0), tokenizer)
    windows, _ = text_windows(tokenizer, evaluation_text(args.eval_source), args.seqlen, args.max_windows)
    dense_params = count_params(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        counts = {**dense_params, "decoder_dense": dense_params["decoder"], "total_dense": dense_params["total"]}
        dense_record = PruningRecord(args.model, "dense", {}, 0.0, 0.0, counts, [], {})
        rows += measure("dense", model, tokenizer, dense_record, windows, args, work)
        for shape in shapes:
            for method in args.methods.split(","):
                options = METHODS.get(method, {})
                kwargs = {} if shape == "free" else {"shape": shape}
                for subnetwork in run_method(model, tokenizer, method, targets, options, calibration=calibration, **kwargs):
                    compact, params = compact_subnetwork(model, subnetwork, args.pad_to)
                    compact, form = saved_form(compact)
                    record = _record(args, method, options, subnetwork, compact, params, form)
                    name = f"{method}-{shape}-s{subnetwork.target:.2f}"
                    for row in measure(name, compact, tokenizer, record, windows, args, work):
                        rows.append(
                            {**row, "method": method, "shape": shape, "target": subnetwork.target, "sparsity": record.sparsity}
                        )
        time_rows(rows, args)
    dense = rows[0]
    print(f"{args.model}: llama.cpp (llama-cpp-python, {args.threads} threads, f32 GGUF) vs the project's evaluator")
    print(
        f"perplexity on {len(windows)} x {args.seqlen} tokens of {args.eval_source}; prefill {args.prefill}, decode {args.decode}"
    )
    print(
        "| model | sparsity | ppl (project) | ppl (llama.cpp) | rel. diff | prefill tok/s | x dense | / bound "
        "| decode tok/s | x dense | GGUF MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        bound = dense["matrix_params"] / row["matrix_params"]
        row["param_bound"] = bound
        row["prefill_speedup_over_bound"] = row["prefill_speedup"] / bound
        print(
            f"| {row['model']} | {row.get('sparsity', 0.0):.1%} | {row['ppl_project']:.3f} | {row['ppl_llama_cpp']:.3f} "
            f"| {row['ppl_relative_difference']:.1e} | {row['prefill_tok_s']:.1f} | {row['prefill_speedup']:.2f} "
            f"| {row['prefill_speedup_over_bound']:.2f} | {row['decode_tok_s']:.1f} | {row['decode_speedup']:.2f} "
            f"| {row['gguf_mib']:.1f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    worst = max(row["ppl_relative_difference"] for row in rows)
    print(f"largest perplexity difference, llama.cpp vs the project: {worst:.1e} (relative)")


if __name__ == "__main__":
    main()
