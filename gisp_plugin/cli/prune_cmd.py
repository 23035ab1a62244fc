"""``gisp prune``: one method, several targets, one compacted model per target (and the trajectory)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from gisp_plugin.checkpoint.saving import save_pruned
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.deploy.padding import default_pad_to
from gisp_plugin.deploy.quantize import CHOICES, check_quantization, quantization_info, quantize_model
from gisp_plugin.deploy.size import weights_bytes
from gisp_plugin.methods.options import parse_assignments
from gisp_plugin.models.loading import DEFAULT_MODEL, load_model
from gisp_plugin.pruning import check_targets, compact_subnetwork, pruning_record, resolve_method, run_method
from gisp_plugin.recovery.lora import RecoveryOptions, RecoveryReport, recover

log = logging.getLogger(__name__)


def parse_sparsities(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"sparsity list {text!r} must be numbers like 0.2,0.3,0.5") from err


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, device and dtype options shared by every command that loads a model."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local folder or {DEFAULT_MODEL!r} (default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--attn", default=None, help="attention implementation: eager, sdpa, ...")
    parser.add_argument("--seed", type=int, default=0)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration", default=None, help="calibration data source (default: the method's own)")
    parser.add_argument("--n-samples", type=int, default=None, help="calibration sequences")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sequence")


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        "-q",
        default=None,
        metavar="QUANT",
        help=f"quantise with torchao after pruning: {', '.join(CHOICES)} (int4wo:group_size=N); CPU runs int8wo, int8dq",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("prune", help="prune a model to one or more sparsities and save compacted models")
    add_model_arguments(parser)
    parser.add_argument("--method", required=True, help="method name (see `gisp methods`)")
    parser.add_argument("--sparsity", required=True, type=parse_sparsities, help="targets, e.g. 0.2,0.3,0.5")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--option", "-o", action="append", default=[], help="method option name=value (repeatable)")
    add_calibration_arguments(parser)
    parser.add_argument(
        "--pad-to",
        type=int,
        default=None,
        help="round MLP widths up to a multiple with inert zero channels (default: 64 on CUDA, 1 = none elsewhere)",
    )
    add_quantize_argument(parser)
    parser.add_argument("--trajectory-only", action="store_true", help="write only the trajectory (nested methods)")
    parser.add_argument(
        "--recover-steps", type=int, default=0, help="LoRA recovery fine-tuning steps on each compacted model (default 0: off)"
    )
    parser.set_defaults(run=run)


def calibration_request(spec, args: argparse.Namespace) -> CalibrationRequest | None:
    """The user's calibration choice, falling back field by field on the method's reference default."""
    default = spec.default_calibration_request(args.seed)
    if default is None:
        return None
    return CalibrationRequest(
        source=args.calibration or default.source,
        n_samples=args.n_samples or default.n_samples,
        seqlen=args.seqlen or default.seqlen,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    options = parse_assignments(args.option)
    spec, parsed = resolve_method(args.method, options)  # fail on a bad name, option or target before loading anything
    check_targets(args.sparsity, reachable=1.0)
    if args.trajectory_only and not spec.nested:
        raise ValueError(f"method {args.method!r} is not nested; --trajectory-only needs a nested method")
    request = calibration_request(spec, args)
    quantization = check_quantization(args.quantize, args.device, args.dtype)
    pad_to = default_pad_to(args.device, args.pad_to)
    if args.recover_steps and request is None and not args.calibration:
        raise ValueError(f"method {args.method!r} uses no data; give --calibration SOURCE for --recover-steps")
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.attn)
    recovery_data = None
    if args.recover_steps:
        recovery_request = request or CalibrationRequest(args.calibration, args.n_samples or 128, args.seqlen or 128, args.seed)
        recovery_data = load_calibration(recovery_request, tokenizer)

    out: Path = args.out
    trajectory = Trajectory()
    summary = []
    started = time.perf_counter()
    for subnetwork in run_method(
        model, tokenizer, args.method, args.sparsity, options, request, args.seed, out / ".work", trajectory
    ):
        line = {"target": subnetwork.target, "structural_sparsity": round(subnetwork.sparsity, 5)}
        if not args.trajectory_only:
            compact, params = compact_subnetwork(model, subnetwork, pad_to)
            if recovery_data is not None:
                report = RecoveryReport()
                recover(compact, tokenizer, recovery_data, RecoveryOptions(steps=args.recover_steps, seed=args.seed), report)
                subnetwork.info["recovery"] = {"steps": args.recover_steps, "data": recovery_data.name, "losses": report.losses}
            if quantization is not None:
                quantize_model(compact, quantization)
            record = pruning_record(
                args.model,
                args.method,
                parsed,
                subnetwork,
                compact,
                params,
                request.label if request else None,
                args.seed,
            )
            record.info["pad_to"] = pad_to
            if quantization is not None:
                record.info["quantization"] = quantization_info(quantization)
            name = f"{args.method}-s{subnetwork.target:.2f}" + (f"-{quantization.slug}" if quantization else "")
            folder = save_pruned(compact, tokenizer, out / name, record)
            line.update(folder=str(folder), sparsity=round(record.sparsity, 5), params=params)
            line["weights_mib"] = round(weights_bytes(folder) / 2**20, 3)
            del compact
        line["elapsed_s"] = round(time.perf_counter() - started, 2)
        summary.append(line)
        log.info("target %.2f: %s", subnetwork.target, json.dumps(line))
        if spec.nested:
            out.mkdir(parents=True, exist_ok=True)
            trajectory.save(out / "trajectory.json")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(
        json.dumps({"model": args.model, "method": args.method, "options": options, "results": summary}, indent=1)
    )
    for line in summary:
        print(json.dumps(line))
    return 0
