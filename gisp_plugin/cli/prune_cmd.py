"""``gisp prune``: one method, several targets, one compacted model per target (and the trajectory).

Under ``torchrun`` (``torchrun --nproc-per-node N -m gisp_plugin prune ...``) every rank checks the inputs,
loads the whole model onto its own device (``cuda:LOCAL_RANK``) and the whole calibration set, then the
ranks join one process group and run the method data parallel (each calibrates on its share of the data;
see ``gisp_plugin.distributed``): they reach the same subnetworks. Then they leave the group, and rank 0
alone compacts, saves and prints, so no rank ever waits on rank 0's writing. ``pruning.json`` records the
setup (``distributed: {world_size, backend, fsdp}``); the run's request (``run.json``) does not name it, so
a run started on N ranks resumes on M.

With ``--fsdp`` the ranks join the group first and each loads only its shard of every tensor (FSDP2
``fully_shard`` per decoder layer; ``gisp_plugin.distributed``), so no rank holds the whole model; methods
declared ``shardable`` (gisp, llm_pruner) score on the sharded model, and each compacted model is gathered
layer by layer onto rank 0, which writes it. ``--cpu-offload`` keeps the shards in CPU memory between uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from gisp_plugin.checkpoint.run_folder import RunFolder, open_run_folder
from gisp_plugin.checkpoint.saving import save_pruned
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.cli.arguments import add_shape_argument, int_at_least, parse_sparsities
from gisp_plugin.cli.export_cmd import add_export_options, export_options
from gisp_plugin.data.api import CalibrationRequest, CalibrationSet
from gisp_plugin.data.loading import check_data_source, load_calibration
from gisp_plugin.deploy.padding import default_pad_to
from gisp_plugin.deploy.quantize import CHOICES, QuantChoice, check_quantization, quantization_info, quantize_model
from gisp_plugin.deploy.size import weights_bytes
from gisp_plugin.distributed.context import DistributedSetup, device_for, init_distributed, launch_setup, leave_distributed
from gisp_plugin.distributed.sharded_loading import load_sharded_model
from gisp_plugin.export.native import saved_form
from gisp_plugin.export.run import export_beside, export_format
from gisp_plugin.inputs import InputError, check_attention, check_device, check_seqlen, context_limit, folder_context_limit
from gisp_plugin.methods.api import MethodSpec
from gisp_plugin.methods.options import options_to_dict, parse_assignments
from gisp_plugin.models.loading import DEFAULT_MODEL, load_model, parse_dtype
from gisp_plugin.pruning import (
    check_before_loading,
    check_run,
    check_targets,
    compact_subnetwork,
    pruning_record,
    resolve_method,
    run_method,
)
from gisp_plugin.recovery.lora import RecoveryOptions, RecoveryReport, default_targets, recover

log = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, device and dtype options shared by every command that loads a model."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local folder or {DEFAULT_MODEL!r} (default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--attn", default=None, help="attention implementation: eager, sdpa, ...")
    parser.add_argument("--seed", type=int_at_least(0), default=0)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration", default=None, help="calibration data source (default: the method's own)")
    parser.add_argument("--n-samples", type=int_at_least(1), default=None, help="calibration sequences")
    parser.add_argument("--seqlen", type=int_at_least(2), default=None, help="tokens per calibration sequence")


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        "-q",
        default=None,
        metavar="QUANT",
        help=f"quantise with torchao after pruning: {', '.join(CHOICES)} (int4wo:group_size=N); CPU runs int8wo, int8dq",
    )


def add_export_argument(parser: argparse.ArgumentParser) -> None:
    """``--export FORMAT[,FORMAT]`` and the export options, for every command that saves pruned folders."""
    parser.add_argument(
        "--export",
        default=None,
        metavar="FORMAT",
        help="also export every saved model: gguf (llama.cpp), nemotron-nas (vLLM, SGLang, TensorRT-LLM), hf; comma-separated",
    )
    add_export_options(parser)


def check_exports(args: argparse.Namespace) -> list[str]:
    """The ``--export`` format names, each known, and the export options valid (before any model is loaded)."""
    names = [name.strip() for name in (args.export or "").split(",") if name.strip()]
    for name in names:
        export_format(name)
    export_options(args)
    if names and args.quantize:
        raise InputError(
            "--export reads unquantised weights and engines quantise their own way: drop --quantize, "
            "and use --type q8_0 (or f16/bf16) for a smaller GGUF"
        )
    return names


def check_exportable(model: PreTrainedModel, names: list[str], args: argparse.Namespace) -> None:
    """Each format's own check on the dense model (the family and its config decide), before any pruning."""
    for name in names:
        export_format(name).check(model, export_options(args))


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("prune", help="prune a model to one or more sparsities and save compacted models")
    add_model_arguments(parser)
    parser.add_argument("--method", required=True, help="method name (see `gisp methods`)")
    parser.add_argument("--sparsity", required=True, type=parse_sparsities, help="targets, e.g. 0.2,0.3,0.5")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--option", "-o", action="append", default=[], help="method option name=value (repeatable)")
    add_shape_argument(parser)
    add_calibration_arguments(parser)
    parser.add_argument(
        "--pad-to",
        type=int_at_least(1),
        default=None,
        help="round MLP widths up to a multiple with inert zero channels (default: 64 on CUDA, 1 = none elsewhere)",
    )
    add_quantize_argument(parser)
    add_export_argument(parser)
    parser.add_argument("--trajectory-only", action="store_true", help="write only the trajectory (nested methods)")
    parser.add_argument(
        "--recover-steps",
        type=int_at_least(0),
        default=0,
        help="LoRA recovery fine-tuning steps on each compacted model (default 0: off)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an --out folder that holds another run (swapped in when complete)"
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model across the ranks with FSDP2 (methods that score by gradients: gisp, llm_pruner)",
    )
    parser.add_argument(
        "--cpu-offload", action="store_true", help="with --fsdp: keep the shards in CPU memory between uses (CPUOffloadPolicy)"
    )
    parser.set_defaults(run=run, data_parallel=True)


def _given(value, default):
    """``value`` unless it was not given (``None``); 0 and "" are values, never replaced by the default."""
    return default if value is None else value


def calibration_request(spec, args: argparse.Namespace) -> CalibrationRequest | None:
    """The user's calibration choice, falling back field by field on the method's reference default."""
    default = spec.default_calibration_request(args.seed)
    if default is None:
        if any(value is not None for value in (args.calibration, args.n_samples, args.seqlen)) and not args.recover_steps:
            log.warning("method %r uses no calibration data: --calibration, --n-samples and --seqlen are not used", spec.name)
        return None
    return CalibrationRequest(
        source=_given(args.calibration, default.source),
        n_samples=_given(args.n_samples, default.n_samples),
        seqlen=_given(args.seqlen, default.seqlen),
        seed=args.seed,
    )


def recovery_request(request: CalibrationRequest | None, args: argparse.Namespace) -> CalibrationRequest | None:
    """The data LoRA recovery trains on: the method's calibration request, or the user's own source."""
    if not args.recover_steps:
        return None
    if request is not None:
        return request
    if args.calibration is None:
        raise ValueError(f"method {args.method!r} uses no data; give --calibration SOURCE for --recover-steps")
    return CalibrationRequest(args.calibration, _given(args.n_samples, 128), _given(args.seqlen, 128), args.seed)


def run_request(args: argparse.Namespace, parsed, targets, request: CalibrationRequest | None, recovery) -> dict:
    """What makes two runs the same run: rerunning it into its folder resumes instead of refusing."""
    model = str(Path(args.model).expanduser().resolve()) if Path(args.model).expanduser().exists() else args.model
    return {
        "model": model,
        "method": args.method,
        "options": options_to_dict(parsed),
        "targets": list(targets),
        "calibration": request.label if request else None,
        "seed": args.seed,
        "dtype": str(parse_dtype(args.dtype)).removeprefix("torch."),
        "pad_to": args.pad_to,
        "quantize": args.quantize,
        "trajectory_only": args.trajectory_only,
        "recover_steps": args.recover_steps,
        "recovery_data": recovery.label if recovery else None,
        "export": args.export,
    } | ({"shape": args.shape} if args.shape != "free" else {})  # free runs resume from folders written before shapes


def check_inputs(args: argparse.Namespace) -> tuple:
    """Every check that needs no model: method, options, targets, data, device, dtype, context, folder."""
    options = parse_assignments(args.option)
    spec, parsed = resolve_method(args.method, options)
    targets = check_targets(args.sparsity, reachable=1.0)
    if args.trajectory_only and not spec.nested:
        raise ValueError(f"method {args.method!r} is not nested; --trajectory-only needs a nested method")
    parse_dtype(args.dtype)
    check_device(args.device)
    check_attention(args.attn)
    request = calibration_request(spec, args)
    quantization = check_quantization(args.quantize, args.device, args.dtype)
    args.exports = check_exports(args)
    args.pad_to = default_pad_to(args.device, args.pad_to)
    recovery = recovery_request(request, args)
    check_ranks(request, launch_setup())
    check_sharding(args, spec, launch_setup())
    check_before_loading(args.model, args.method, targets, options)  # steps and reach, from config.json alone
    limit = folder_context_limit(args.model) if Path(args.model).expanduser().is_dir() else None
    for what, data in (("calibration", request), ("recovery", recovery)):
        if data is not None:
            check_data_source(data.source)  # an unknown name, a missing file or an offline hub dataset fails here
            check_seqlen(what, data.seqlen, limit, args.model)
    request_record = run_request(args, parsed, targets, request, recovery)
    folder = open_run_folder(args.out, request_record, args.overwrite, lock=launch_setup().is_main)
    return options, spec, parsed, targets, request, recovery, quantization, folder


def check_ranks(request: CalibrationRequest | None, launch: DistributedSetup) -> None:
    """Under torchrun every rank needs at least one calibration sequence (checked before the model loads)."""
    if request is not None and launch.world_size > request.n_samples:
        raise ValueError(
            f"--n-samples {request.n_samples} cannot be split across {launch.world_size} ranks; "
            f"give at least {launch.world_size} calibration samples, or fewer ranks"
        )


def check_sharding(args: argparse.Namespace, spec: MethodSpec, launch: DistributedSetup) -> None:
    """``--fsdp`` needs torchrun with several ranks and a method that scores sharded models."""
    if args.cpu_offload and not args.fsdp:
        raise InputError("--cpu-offload keeps FSDP shards in CPU memory; give it together with --fsdp")
    if not args.fsdp:
        return
    if not launch.enabled:
        raise InputError("--fsdp shards the model across ranks: launch with torchrun --nproc-per-node N (N >= 2)")
    if not spec.shardable:
        raise InputError(
            f"method {spec.name!r} does not run on a model sharded with --fsdp; run it data parallel (torchrun without --fsdp)"
        )


def load_for_job(args: argparse.Namespace) -> tuple[PreTrainedModel, Any, DistributedSetup | None]:
    """The model and tokenizer on this rank's device; with ``--fsdp`` the ranks join first and each loads its shard
    (the setup is returned then; otherwise the ranks join after every check, in ``run``)."""
    launch = launch_setup()
    if not args.fsdp:
        return *load_model(args.model, device_for(launch, args.device), args.dtype, args.attn), None
    setup = init_distributed(args.device, fsdp=True)
    device = device_for(setup, args.device)
    model, tokenizer = load_sharded_model(args.model, device, args.dtype, setup, args.cpu_offload, args.attn)
    return model, tokenizer, setup


def run(args: argparse.Namespace) -> int:
    options, spec, parsed, targets, request, recovery, quantization, folder = check_inputs(args)  # before loading anything
    try:  # the folder's lock is held from its check to the end of the run, however it ends
        return _run_into(args, folder, options, spec, parsed, targets, request, recovery, quantization)
    finally:
        folder.release()


def _run_into(args, folder: RunFolder, options, spec, parsed, targets, request, recovery, quantization) -> int:
    """Load, check against the model, prune and write: everything after the checks that need no model."""
    model, tokenizer, sharded = load_for_job(args)
    check_run(model, args.method, targets, options, request, args.shape)  # reach of the targets, context, finite weights
    check_exportable(model, args.exports, args)
    if recovery is not None:
        check_seqlen("recovery", recovery.seqlen, context_limit(model.config), args.model)
    main = launch_setup().is_main
    recovery_data = load_calibration(recovery, tokenizer) if recovery is not None and main else None
    setup = sharded or init_distributed(args.device)  # every check passed on every rank: join the job (nothing outside torchrun)
    if main:
        folder.start()
    try:
        summary = prune_into(
            args, folder, spec, parsed, model, tokenizer, targets, options, request, recovery_data, quantization, setup
        )
    except BaseException:
        if main:
            folder.abandon_if_empty()  # a run that failed before any result leaves no folder that blocks the next
        raise
    if main:
        for line in summary:
            print(json.dumps(line))
    return 0


def prune_into(
    args: argparse.Namespace,
    folder: RunFolder,
    spec: MethodSpec,
    parsed: Any,
    model: PreTrainedModel,
    tokenizer: Any,
    targets: tuple[float, ...],
    options: dict[str, str],
    request: CalibrationRequest | None,
    recovery_data: CalibrationSet | None,
    quantization: QuantChoice | None,
    setup: DistributedSetup | None = None,
) -> list[dict[str, Any]]:
    """Run the method and write every compacted model (and the trajectory) into the run folder.

    One process writes each model as soon as its target is reached. Under torchrun every rank runs the
    method to its end, the ranks leave the group, and rank 0 alone writes (the others return nothing).
    A sharded (``--fsdp``) job stays together while compacting: every rank takes part in gathering each
    compacted model onto rank 0, which writes it.
    """
    setup = setup or DistributedSetup()
    out: Path = folder.path
    trajectory = Trajectory()
    summary = []
    started = time.perf_counter()
    subnetworks = run_method(
        model, tokenizer, args.method, targets, options, request, args.seed, out / ".work", trajectory, args.shape
    )
    if setup.enabled:
        subnetworks = list(subnetworks)  # keep masks and biases: small; the collective work ends here
        if setup.fsdp and not args.trajectory_only:
            if not setup.is_main:  # help gather every compacted model onto rank 0, which writes
                for subnetwork in subnetworks:
                    compact_subnetwork(model, subnetwork, args.pad_to)
                leave_distributed()
                return []
        else:
            leave_distributed()
            if not setup.is_main:
                return []
    for subnetwork in subnetworks:
        line = {"target": subnetwork.target, "structural_sparsity": round(subnetwork.sparsity, 5)}
        if not args.trajectory_only:
            compact, params = compact_subnetwork(model, subnetwork, args.pad_to)
            if recovery_data is not None:
                report = RecoveryReport()
                recovery_options = RecoveryOptions(steps=args.recover_steps, seed=args.seed, targets=default_targets(model))
                recover(compact, tokenizer, recovery_data, recovery_options, report)
                subnetwork.info["recovery"] = {"steps": args.recover_steps, "data": recovery_data.name, "losses": report.losses}
            layers = getattr(compact.config, "pruned_layers", [])
            compact, form = saved_form(compact)
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
                setup,
                layers,
                args.shape,
            )
            record.info["pad_to"] = args.pad_to
            record.info["saved_form"] = form
            if quantization is not None:
                record.info["quantization"] = quantization_info(quantization)
            name = f"{args.method}-s{subnetwork.target:.2f}" + (f"-{quantization.slug}" if quantization else "")
            saved = save_pruned(compact, tokenizer, out / name, record)
            line.update(folder=str(folder.final_path(saved)), sparsity=round(record.sparsity, 5), params=params)
            line["form"] = form["form"]
            if args.exports:
                reports = export_beside(saved, args.exports, export_options(args))
                line["exports"] = [str(folder.final_path(report.path)) for report in reports]
            line["weights_mib"] = round(weights_bytes(saved) / 2**20, 3)
            del compact
        line["elapsed_s"] = round(time.perf_counter() - started, 2)
        summary.append(line)
        log.info("target %.2f: %s", subnetwork.target, json.dumps(line))
        if spec.nested:
            trajectory.save(out / "trajectory.json")
    if setup.fsdp:
        leave_distributed()
    folder.finish(summary)
    return summary
