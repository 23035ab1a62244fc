"""Run one checked ``PruneRequest``: load, prune to every target, write one compacted model per target.

``prune(request)`` is what ``gisp prune`` runs once its flags are a ``PruneRequest``, and what a Python caller
runs with one it built itself; nothing here sees the command line.

Under ``torchrun`` (``torchrun --nproc-per-node N -m gisp_plugin prune ...``) every rank checks the inputs,
loads the whole model onto its own device (``cuda:LOCAL_RANK``) and the whole calibration set, then the
ranks join one process group and run the method data parallel (each calibrates on its share of the data;
see ``gisp_plugin.distributed``): they reach the same subnetworks. Then they leave the group, and rank 0
alone compacts, saves and prints, so no rank ever waits on rank 0's writing. ``pruning.json`` records the
setup (``distributed: {world_size, backend, fsdp}``); the run's request (``run.json``) does not name it, so
a run started on N ranks resumes on M.

With ``fsdp`` the ranks join the group first and each loads only its shard of every tensor (FSDP2
``fully_shard`` per decoder layer; ``gisp_plugin.distributed``), so no rank holds the whole model; methods
declared ``shardable`` (gisp, llm_pruner) score on the sharded model, and each compacted model is gathered
layer by layer onto rank 0, which writes it. ``cpu_offload`` keeps the shards in CPU memory between uses.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from gisp_plugin.checkpoint.run_folder import RunFolder, open_run_folder
from gisp_plugin.checkpoint.saving import save_pruned
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.deploy.quantize import quantization_info, quantize_model
from gisp_plugin.deploy.size import weights_bytes
from gisp_plugin.distributed.context import DistributedSetup, device_for, init_distributed, launch_setup, leave_distributed
from gisp_plugin.distributed.sharded_loading import load_sharded_model
from gisp_plugin.export.native import saved_form
from gisp_plugin.export.run import export_beside, export_format
from gisp_plugin.inputs import check_seqlen, context_limit
from gisp_plugin.models.loading import load_model
from gisp_plugin.prune_request import PruneRequest
from gisp_plugin.pruning import check_run, compact_subnetwork, pruning_record, run_method
from gisp_plugin.recovery.lora import RecoveryOptions, RecoveryReport, default_targets, recover

log = logging.getLogger(__name__)


def prune(request: PruneRequest) -> list[dict[str, Any]]:
    """Run ``request`` into its run folder (``request.out``) and return one summary line per target.

    The folder is locked from its check to the end of the run, however it ends; rerunning the same request
    resumes it. Under torchrun every rank calls this; rank 0 returns the summary, the others ``[]``.
    """
    folder = open_run_folder(request.out, request.record(), request.overwrite, lock=launch_setup().is_main)
    try:
        return _run_into(request, folder)
    finally:
        folder.release()


def check_exportable(model: PreTrainedModel, request: PruneRequest) -> None:
    """Each format's own check on the dense model (the family and its config decide), before any pruning."""
    for name in request.export:
        export_format(name).check(model, request.export_options)


def load_for_job(request: PruneRequest) -> tuple[PreTrainedModel, Any, DistributedSetup | None]:
    """The model and tokenizer on this rank's device; with ``fsdp`` the ranks join first and each loads its shard
    (the setup is returned then; otherwise the ranks join after every check, in ``prune``)."""
    launch = launch_setup()
    if not request.fsdp:
        return *load_model(request.model, device_for(launch, request.device), request.dtype, request.attn), None
    setup = init_distributed(request.device, fsdp=True)
    device = device_for(setup, request.device)
    model, tokenizer = load_sharded_model(request.model, device, request.dtype, setup, request.cpu_offload, request.attn)
    return model, tokenizer, setup


def _run_into(request: PruneRequest, folder: RunFolder) -> list[dict[str, Any]]:
    """Load, check against the model, prune and write: everything after the checks that need no model."""
    model, tokenizer, sharded = load_for_job(request)
    # reach of the targets, context, finite weights
    check_run(model, request.method, request.targets, request.options, request.data, request.shape)
    check_exportable(model, request)
    if request.recovery_data is not None:
        check_seqlen("recovery", request.recovery_data.seqlen, context_limit(model.config), request.model)
    main = launch_setup().is_main
    recovery_data = load_calibration(request.recovery_data, tokenizer) if request.recovery_data is not None and main else None
    # every check passed on every rank: join the job (nothing outside torchrun)
    setup = sharded or init_distributed(request.device)
    if main:
        folder.start()
    try:
        return prune_into(request, folder, model, tokenizer, recovery_data, setup)
    except BaseException:
        if main:
            folder.abandon_if_empty()  # a run that failed before any result leaves no folder that blocks the next
        raise


def prune_into(
    request: PruneRequest,
    folder: RunFolder,
    model: PreTrainedModel,
    tokenizer: Any,
    recovery_data: CalibrationSet | None,
    setup: DistributedSetup | None = None,
) -> list[dict[str, Any]]:
    """Run the method and write every compacted model (and the trajectory) into the run folder.

    One process writes each model as soon as its target is reached. Under torchrun every rank runs the
    method to its end, the ranks leave the group, and rank 0 alone writes (the others return nothing).
    A sharded (``fsdp``) job stays together while compacting: every rank takes part in gathering each
    compacted model onto rank 0, which writes it.
    """
    setup = setup or DistributedSetup()
    out: Path = folder.path
    trajectory = Trajectory()
    summary = []
    started = time.perf_counter()
    subnetworks = run_method(
        model,
        tokenizer,
        request.method,
        request.targets,
        request.options,
        request.data,
        request.seed,
        out / ".work",
        trajectory,
        request.shape,
    )
    if setup.enabled:
        subnetworks = list(subnetworks)  # keep masks and biases: small; the collective work ends here
        if setup.fsdp and not request.trajectory_only:
            if not setup.is_main:  # help gather every compacted model onto rank 0, which writes
                for subnetwork in subnetworks:
                    compact_subnetwork(model, subnetwork, request.pad_to)
                leave_distributed()
                return []
        else:
            leave_distributed()
            if not setup.is_main:
                return []
    quantization = request.quantization
    for subnetwork in subnetworks:
        line = {"target": subnetwork.target, "structural_sparsity": round(subnetwork.sparsity, 5)}
        if not request.trajectory_only:
            compact, params = compact_subnetwork(model, subnetwork, request.pad_to)
            if recovery_data is not None:
                report = RecoveryReport()
                options = RecoveryOptions(steps=request.recover_steps, seed=request.seed, targets=default_targets(model))
                recover(compact, tokenizer, recovery_data, options, report)
                losses = report.losses
                subnetwork.info["recovery"] = {"steps": request.recover_steps, "data": recovery_data.name, "losses": losses}
            layers = getattr(compact.config, "pruned_layers", [])
            compact, form = saved_form(compact)
            if quantization is not None:
                quantize_model(compact, quantization)
            record = pruning_record(
                request.model,
                request.method,
                request.method_options,
                subnetwork,
                compact,
                params,
                request.data.label if request.data else None,
                request.seed,
                setup,
                layers,
                request.shape,
            )
            record.info["pad_to"] = request.pad_to
            record.info["saved_form"] = form
            if quantization is not None:
                record.info["quantization"] = quantization_info(quantization)
            name = f"{request.method}-s{subnetwork.target:.2f}" + (f"-{quantization.slug}" if quantization else "")
            saved = save_pruned(compact, tokenizer, out / name, record)
            line.update(folder=str(folder.final_path(saved)), sparsity=round(record.sparsity, 5), params=params)
            line["form"] = form["form"]
            if request.export:
                reports = export_beside(saved, list(request.export), request.export_options)
                line["exports"] = [str(folder.final_path(report.path)) for report in reports]
            line["weights_mib"] = round(weights_bytes(saved) / 2**20, 3)
            del compact
        line["elapsed_s"] = round(time.perf_counter() - started, 2)
        summary.append(line)
        log.info("target %.2f: %s", subnetwork.target, json.dumps(line))
        if request.spec.nested:
            trajectory.save(out / "trajectory.json")
    if setup.fsdp:
        leave_distributed()
    folder.finish(summary)
    return summary
