"""``gisp eval``: evaluate one model (dense, or a pruned folder) with named evaluators.

``--eval`` takes a spec ``NAME:option=value,...`` (list items joined with ``+``) and may be repeated:
``gisp eval --model runs/gisp-s0.30 --eval perplexity:seqlen=128 --eval lm_eval:tasks=boolq+arc_easy,limit=50``.
``--prepare-offline-tasks`` only writes the offline task folder for lm-eval's own command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from gisp_plugin.checkpoint.saving import count_params, is_pruned_folder, read_record
from gisp_plugin.cli.prune_cmd import add_model_arguments, add_quantize_argument
from gisp_plugin.deploy.model_card import write_model_card
from gisp_plugin.deploy.quantize import QuantizationError, check_quantization, quantization_of, quantize_model
from gisp_plugin.deploy.size import serialized_bytes, size_metrics
from gisp_plugin.evaluation.api import EvalResult
from gisp_plugin.evaluation.offline_data import prepare_offline_tasks
from gisp_plugin.evaluation.specs import check_spec_inputs, evaluate, parse_eval_specs
from gisp_plugin.inputs import InputError, check_attention, check_device, check_output_folder, folder_context_limit
from gisp_plugin.models.loading import load_model, parse_dtype, resolve_model_path

log = logging.getLogger(__name__)

DEFAULT_EVAL = "perplexity:source=boolq-wiki,seqlen=128"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="evaluate one model (dense or pruned folder): perplexity, lm-eval tasks")
    add_model_arguments(parser)
    parser.add_argument(
        "--eval",
        dest="evals",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"evaluator spec NAME:option=value,... (list items joined with +), repeatable; default {DEFAULT_EVAL!r}",
    )
    parser.add_argument("--json", type=Path, default=None, help="write metrics and details to this JSON file")
    add_quantize_argument(parser)
    parser.add_argument(
        "--write-card", action="store_true", help="write the results into the pruned folder's model card (README.md)"
    )
    parser.add_argument(
        "--prepare-offline-tasks",
        metavar="TASKS",
        default=None,
        help="only write the offline lm-eval task folder for these tasks (comma list) and print its path",
    )
    parser.set_defaults(run=run)


def _format(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def result_table(results: dict[str, EvalResult]) -> str:
    """A plain-text table: one line per metric, grouped by spec, with each spec's settings."""
    lines = []
    for spec, result in results.items():
        details = result.details
        settings = []
        if "seqlen" in details:
            settings.append(f"context length {details['seqlen']} tokens, {details['windows']} windows")
        if details.get("evaluator") == "lm_eval":
            settings.append(f"limit {details['limit']}, {'offline' if details['offline'] else 'hub'} data")
        lines.append(f"{spec}  ({'; '.join(settings)}; {details.get('elapsed_s', '?')} s)" if settings else spec)
        width = max(len(name) for name in result.metrics) if result.metrics else 0
        lines += [f"  {name.ljust(width)}  {_format(value)}" for name, value in result.metrics.items()]
        if details.get("evaluator") == "lm_eval" and details.get("offline"):
            lines.append("  data: offline, evaluation part of each validation split (index % 4 != 0)")
        if "mean_acc" in result.metrics:
            lines.append(f"  mean_acc: {details['mean_acc_rule']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.prepare_offline_tasks is not None:
        tasks = [t.strip() for t in args.prepare_offline_tasks.split(",") if t.strip()]
        if not tasks:
            raise InputError("--prepare-offline-tasks names no task; give a comma list such as boolq,piqa")
        folder = prepare_offline_tasks(tasks)
        print(folder)
        return 0
    specs = parse_eval_specs(args.evals or [DEFAULT_EVAL])  # bad names or options fail before loading
    parse_dtype(args.dtype)
    check_device(args.device)
    check_attention(args.attn)
    if args.json is not None:
        if args.json.is_dir():
            raise InputError(f"--json {str(args.json)!r} is a folder; give a file path")
        check_output_folder(args.json.parent, "--json folder")
    limit = folder_context_limit(args.model) if Path(args.model).expanduser().is_dir() else None
    check_spec_inputs(specs, limit, args.model)
    quantization = check_quantization(args.quantize, args.device, args.dtype)
    path = resolve_model_path(args.model)
    if args.write_card and (not is_pruned_folder(path) or quantization):
        raise ValueError("--write-card writes into a pruned folder's card: give a folder from `gisp prune`, without --quantize")
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.attn)
    model_info = {"model": args.model, "params": count_params(model), "dtype": args.dtype, "device": args.device}
    if is_pruned_folder(path):
        record = read_record(path)
        model_info.update(method=record["method"], target=record["target"], sparsity=record["sparsity"])
    log.info("loaded %s in %.1f s", args.model, time.perf_counter() - started)
    if quantization is not None:
        if quantization_of(model):
            raise QuantizationError(f"{args.model!r} is already quantised ({quantization_of(model)}); drop --quantize")
        quantize_model(model, quantization)
        model_info["quantization"] = quantization.label
    model_info.update(size_metrics(serialized_bytes(model), model_info["params"]["total"]))
    results = evaluate(model, tokenizer, specs)
    header = f"model {args.model}: {model_info['params']['total']:,} parameters"
    if "sparsity" in model_info:
        header += f", {model_info['method']} at structural sparsity {model_info['sparsity']:.3f}"
    if quantization is not None:
        header += f", quantised {quantization.label}"
    header += f"; weights {model_info['size_mib']:.1f} MiB, {model_info['bytes_per_param']:.2f} bytes/parameter"
    print(header)
    print(result_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            **model_info,
            "results": {spec: {"metrics": r.metrics, "details": r.details} for spec, r in results.items()},
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    if args.write_card:
        card = write_model_card(path, read_record(path), {spec: r.metrics for spec, r in results.items()})
        log.info("wrote the results into %s", card)
    return 0
