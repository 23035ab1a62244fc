"""The one pruning loop every method runs in.

It checks the request, finds the adapter and the method through the plugin manager, loads the
calibration data, puts removable masks on the dense model, lets the method yield its subnetworks, and
gives the dense model back untouched however the run ends.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.adapters.self_check import self_check
from gisp_plugin.anatomy.structures import ModelAnatomy
from gisp_plugin.checkpoint.saving import PruningRecord, count_params
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationRequest, CalibrationSet
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.distributed.context import DistributedSetup
from gisp_plugin.distributed.fsdp import is_sharded
from gisp_plugin.distributed.sharded_compaction import compact_sharded
from gisp_plugin.finite import check_finite_tensors, check_finite_weights
from gisp_plugin.importance.shapes import check_shape, violation
from gisp_plugin.inputs import check_int, check_seqlen, context_limit
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.masking.updated_weights import updated_weights
from gisp_plugin.methods.api import MethodSpec, PruningJob, Subnetwork
from gisp_plugin.methods.options import options_to_dict, parse_options
from gisp_plugin.plugins.manager import lookup

log = logging.getLogger(__name__)

# A subnetwork may miss its target by the parameters of the largest single structure; beyond this
# absolute slack the method is wrong, not coarse.
TARGET_SLACK = 0.02


class TargetError(ValueError):
    """A sparsity target that is out of range or unreachable."""


def check_targets(targets: Sequence[float], reachable: float) -> tuple[float, ...]:
    """Sorted unique targets, each in (0, 1) and reachable; otherwise one clear error."""
    if isinstance(targets, (int, float)) and not isinstance(targets, bool):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise TargetError(f"give at least one sparsity target, e.g. [0.2, 0.3, 0.5]; got {targets!r}")
    if any(isinstance(t, bool) or not isinstance(t, (int, float)) for t in targets):
        raise TargetError(f"sparsity targets must be numbers such as 0.2, got {list(targets)!r}")
    for target in targets:
        if not 0.0 < target < 1.0:
            raise TargetError(f"sparsity {target} is outside (0, 1); give fractions such as 0.2,0.3,0.5")
        if target > reachable + 1e-9:
            raise TargetError(
                f"sparsity {target} is above what the prunable layers can give ({reachable:.3f}); "
                "lower the target or unprotect layers"
            )
    return tuple(sorted(set(float(t) for t in targets)))


def resolve_method(name: str, options: dict[str, Any] | None = None) -> tuple[MethodSpec, Any]:
    spec: MethodSpec = lookup("method", name)
    return spec, parse_options(spec.options, options or {}, method=name)


@dataclass(frozen=True)
class CheckedRun:
    """A pruning request checked against the loaded model: what ``run_method`` then runs."""

    spec: MethodSpec
    options: Any
    adapter: Any
    anatomy: Any
    targets: tuple[float, ...]


def check_run(
    model: PreTrainedModel,
    method: str,
    targets: Sequence[float],
    options: dict[str, Any] | None = None,
    calibration: CalibrationSet | CalibrationRequest | None = None,
    shape: str = "free",
) -> CheckedRun:
    """Every check a run needs the model for, done before any work: method and options, shape, targets
    within the method's reach, calibration that fits the model's context, finite weights. The checked
    anatomy carries ``shape``, which the shared allocators read (``gisp_plugin.importance.shapes``).

    Callers that write files (``gisp prune``) call it before claiming their folder; ``run_method``
    calls it again, so the Python API gets the same checks.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"run_method needs a transformers model (load one with gisp_plugin.load_model), got {type(model).__name__}"
        )
    spec, parsed = resolve_method(method, options)
    check_shape(shape)
    adapter = adapter_for(model)
    if adapter.derived:  # an anatomy read off the modules is proved on a small copy before any work
        self_check(model, adapter)
    anatomy = dataclasses.replace(adapter.anatomy(model), shape=shape)
    checked = check_against_anatomy(spec, parsed, anatomy, targets)
    if spec.calibration is not None:
        data = calibration if calibration is not None else spec.default_calibration_request()
        longest = data.seqlen if isinstance(data, CalibrationRequest) else max(len(s) for s in data.sequences)
        check_seqlen("calibration", longest, context_limit(model.config), getattr(model, "name_or_path", "") or "the model")
    check_finite_weights(model, f"{method} cannot prune this model")
    return CheckedRun(spec, parsed, adapter, anatomy, checked)


def check_against_anatomy(spec: MethodSpec, options: Any, anatomy: ModelAnatomy, targets: Sequence[float]) -> tuple[float, ...]:
    """The checks that need only the model's structures (no weights): the method's options, the targets' reach."""
    if spec.check_options is not None:
        spec.check_options(anatomy, options)
    reachable = spec.max_sparsity(anatomy, options) if spec.max_sparsity else anatomy.max_sparsity()
    return check_targets(targets, reachable)


def check_before_loading(model: str, method: str, targets: Sequence[float], options: dict[str, Any] | None = None) -> None:
    """``check_against_anatomy`` on a local dense folder's structures, read from its ``config.json`` alone
    (an empty model on the meta device: no weights are read), so a run that cannot work is refused before
    minutes of loading. A hub id or a pruned folder is checked once loaded (``check_run``)."""
    from gisp_plugin.checkpoint.saving import is_pruned_folder

    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file() or is_pruned_folder(folder):
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError):
        return  # loading the model names what is wrong with the folder
    spec, parsed = resolve_method(method, options)
    check_against_anatomy(spec, parsed, adapter_for(empty).anatomy(empty), targets)


def anatomy_provenance(adapter) -> dict[str, str]:
    """Where a run's anatomy came from, for its record: the adapter, declared or derived, (derived) that the
    self-check passed (``check_run`` refuses the run otherwise), and for a hybrid pruned in its MLPs only, why."""
    derived = getattr(adapter, "derived", False)
    provenance = {
        "adapter": adapter.name,
        "anatomy": "derived" if derived else "declared",
        "self_check": "passed" if derived else "not needed",
    }
    partial = getattr(adapter.declaration, "partial", None)
    if partial:  # a hybrid pruned where it follows the pattern only (its MLPs and experts)
        provenance["pruned_in_part"] = partial
    return provenance


def run_method(
    model: PreTrainedModel,
    tokenizer: Any,
    method: str,
    targets: Sequence[float],
    options: dict[str, Any] | None = None,
    calibration: CalibrationSet | CalibrationRequest | None = None,
    seed: int = 0,
    work_dir: Path | None = None,
    trajectory: Trajectory | None = None,
    shape: str = "free",
) -> Iterator[Subnetwork]:
    """Prune ``model`` with ``method`` to every target, yielding subnetworks in ascending order.

    The model is left dense when the iterator finishes or is closed. ``calibration`` may be a ready
    set (shared between methods) or a request; ``None`` uses the method's reference default.
    ``trajectory`` (nested methods) is filled step by step. Every subnetwork carries ``elapsed_s``,
    the method's own time to reach it (a resumed method counts its earlier, interrupted work too).
    A non-finite weight, score or bias stops the run with ``NonFiniteError``. ``shape`` constrains the
    allocation (``free``, ``even-groups``, ``kv-groups``, ``uniform``; ``gisp_plugin.importance.shapes``); a
    subnetwork outside it stops the run.
    """
    check_int("seed", seed, 0)
    check_shape(shape)
    run = check_run(model, method, targets, options, calibration, shape)
    spec, parsed, anatomy, targets = run.spec, run.options, run.anatomy, run.targets

    calibration_set = None
    if spec.calibration is not None:
        if calibration is None:
            calibration = spec.default_calibration_request(seed)
        if isinstance(calibration, CalibrationRequest):
            calibration = load_calibration(calibration, tokenizer)
        calibration_set = calibration

    was_training = model.training
    model.eval()
    masked = MaskedModel(model, anatomy)
    job = PruningJob(
        model=model,
        tokenizer=tokenizer,
        adapter=run.adapter,
        anatomy=anatomy,
        masked=masked,
        targets=targets,
        options=parsed,
        calibration=calibration_set,
        seed=seed,
        work_dir=work_dir,
        trajectory=trajectory if trajectory is not None else Trajectory(),
    )
    job.trajectory.shape = shape
    try:
        expected = list(targets)
        working = 0.0  # seconds spent inside the method (not in the consumer between subnetworks)
        subnetworks = spec.run(job)
        while True:
            started = time.perf_counter()
            subnetwork = next(subnetworks, None)
            working += time.perf_counter() - started
            if subnetwork is None:
                break
            if not expected or subnetwork.target != expected[0]:
                raise RuntimeError(f"method {method!r} yielded target {subnetwork.target}, expected {expected[:1]}")
            expected.pop(0)
            outside = violation(anatomy, subnetwork.keep, shape)
            if outside is not None:
                raise RuntimeError(
                    f"method {method!r} decided a subnetwork outside shape {shape} ({outside}): "
                    "its allocation bypasses the shared allocators of gisp_plugin.importance"
                )
            if abs(subnetwork.sparsity - subnetwork.target) > TARGET_SLACK:
                log.warning("%s reached sparsity %.4f for target %.4f", method, subnetwork.sparsity, subnetwork.target)
            check_finite_tensors(subnetwork.extra_biases, f"{method} at target {subnetwork.target}: compensation bias")
            check_finite_tensors(subnetwork.updated_weights, f"{method} at target {subnetwork.target}: updated weight")
            if subnetwork.elapsed_s is None:
                subnetwork.elapsed_s = working
            subnetwork.info.setdefault("anatomy", anatomy_provenance(run.adapter))
            yield subnetwork
        if expected:
            raise RuntimeError(f"method {method!r} stopped before targets {expected}")
    finally:
        masked.release()
        model.train(was_training)


def compact_subnetwork(
    model: PreTrainedModel, subnetwork: Subnetwork, pad_to: int = 1
) -> tuple[PreTrainedModel | None, dict[str, int]]:
    """The physically smaller model for ``subnetwork`` and its parameter counts before and after.

    Weights the method changed (``subnetwork.updated_weights``) are written into the dense tensors for
    the cut and restored afterwards.

    ``pad_to`` > 1 rounds MLP widths up to a multiple with zero channels: identical outputs, and the
    matrix shapes GPUs run fast (counted parameters then include the padding). A model sharded with FSDP2
    is gathered layer by layer onto rank 0 (every rank must call this); the other ranks get ``(None, {})``.
    """
    if is_sharded(model):
        if subnetwork.updated_weights:
            raise ValueError("a subnetwork with updated weights (slimgpt) cannot be compacted from a sharded model; drop --fsdp")
        compact = compact_sharded(model, subnetwork.keep, subnetwork.extra_biases, pad_to)
        if compact is None:
            return None, {}
    else:
        with updated_weights(model, subnetwork.updated_weights):  # changed kept weights are cut like the others
            compact = adapter_for(model).compact(model, subnetwork.keep, subnetwork.extra_biases, pad_to)
    before, after = count_params(model), count_params(compact)
    params = {
        "decoder_dense": before["decoder"],
        "decoder": after["decoder"],
        "total_dense": before["total"],
        "total": after["total"],
    }
    return compact, params


def pruning_record(
    base_model: str,
    method: str,
    options: Any,
    subnetwork: Subnetwork,
    compact: PreTrainedModel,
    params: dict[str, int],
    calibration: str | None,
    seed: int,
    distributed: DistributedSetup | None = None,
    layers: list[dict] | None = None,
    shape: str = "free",
) -> PruningRecord:
    """The record saved beside a compacted model (sparsity here counts the real tensors); ``distributed``
    is the setup that pruned it (default: one process); ``layers`` are the per-layer shapes (default: the
    compacted model's ``config.pruned_layers``, given when the model saved is the family's own); ``shape``
    the constraint it was pruned under."""
    return PruningRecord(
        base_model=base_model,
        method=method,
        options=options_to_dict(options),
        target=subnetwork.target,
        sparsity=1.0 - params["decoder"] / params["decoder_dense"],
        params=params,
        layers=getattr(compact.config, "pruned_layers", []) if layers is None else layers,
        pruned_structures=subnetwork.keep.to_json(),
        calibration=calibration,
        seed=seed,
        info={"structural_sparsity": subnetwork.sparsity, **subnetwork.info},
        distributed=(distributed or DistributedSetup()).record(),
        shape=shape,
    )
