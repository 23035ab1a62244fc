"""GISP: global iterative structured pruning with first-order Taylor scores (arXiv 2510.18030).

The algorithm, as in the paper and its reference code (``uncc-efficient-ai/GISP``,
``pruners/grad_sp_global.py``), with the choices of ``docs/method.md``:

1. **Gradient**: on the current (masked) model, the gradient of the calibration loss averaged over the
   whole calibration set, ``g = sum of batch gradients / n_samples``, accumulated in float32.
2. **Per-weight score** ``s = |W * g|`` (``W`` the dense weight; the abs is taken after accumulation).
3. **Structure score**: the sum of ``s`` over the weights a structure owns: an attention head's ``q_proj``
   rows and ``o_proj`` columns (plus ``k_proj``/``v_proj`` rows without GQA), an MLP channel's
   ``gate_proj``/``up_proj`` rows and ``down_proj`` column. Under GQA the unit is a query head.
4. **Block-wise normalisation** (``normalize``), so that heads and channels can share one ranking.
5. **Protected layers** (``protect``) score ``+inf`` and are never pruned.
6. **Global ranking**: prune the lowest-scoring heads and channels of the whole model.
7. **Schedule**: ``steps`` gradient recomputations, linear in parameter sparsity from 0 to the largest
   target. Pruned structures have a zero gradient through their mask, so they stay pruned: every cut
   is nested in the previous one, and one run gives every target. ``steps=1`` is one-shot pruning.

Schedule detail: step ``i`` recomputes gradients at the sparsity step ``i - 1`` reached and cuts to
``top * (i + 1) / steps``; a requested target that falls inside a step is cut from that same step's
scores, so it is hit exactly (to within one structure) and ``steps=1`` cuts every target from the dense
model's scores. The reference instead schedules the fraction of *structures* and picks the step
closest to each target.

Every cut is recorded in ``job.trajectory``. With a ``work_dir``, the state after every finished step
is written atomically to ``gisp-state.json``; a rerun with the same model, options, calibration data,
targets and seed resumes from the last finished step and gives identical results (under ``torchrun``
rank 0 alone reads and writes the state; every rank resumes from what rank 0 read). A state from a
different run is ignored (with a warning) and overwritten. Every step records ``elapsed_s``, the GISP
time up to it across interruptions, so a resumed run reports its whole pruning time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.context import is_main_process
from gisp_plugin.distributed.data_parallel import from_main
from gisp_plugin.finite import NonFiniteError
from gisp_plugin.importance.allocation import Groups, Scores, prune_lowest_globally
from gisp_plugin.importance.gradients import GradientSums, accumulate_gradients, weight_paths, weight_tensor
from gisp_plugin.importance.structure_scores import model_scores
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.methods.options import options_to_dict
from gisp_plugin.plugins import hookimpl
from gisp_plugin.plugins.manager import lookup

log = logging.getLogger(__name__)

STATE_FILE = "gisp-state.json"
STATE_FORMAT = "gisp-state/1"
NORMALIZATIONS = ("reference", "param_mean", "block_mean", "none")
GROUPINGS = ("experts", "kv")
CHANNEL_BLOCKS = ("mlp", "shared_expert", "expert_mlp")


@dataclass(frozen=True)
class GispOptions:
    """Options of GISP (``--option name=value``).

    steps: gradient recomputations along the schedule (default 16). The reference uses 112 steps to 70% of
        the structures (~0.6% each), one full calibration pass per step. On SmolLM2 (benchmarks/gisp_steps.py,
        16 x 128 LAMBADA tokens) 16 steps cut BoolQ-passage perplexity at 50% sparsity from 318 (one-shot)
        to 257, while 32 steps gave no further gain (272) at twice the cost. ``1`` is one-shot pruning.
    normalize: ``reference`` (heads / (4 * head_dim * hidden), channels / (3 * intermediate_size), as the
        reference code; channels of a shared or routed expert / (3 * that expert's width), the same rule per
        MLP), ``param_mean`` (each unit / its parameter count), ``block_mean`` (each block type / its mean
        over the live, unprotected units; block types: attention, mlp, shared_expert, expert_mlp), ``none``.
    group: ``none`` (default: heads and channels rank one by one; a routed expert goes with its last
        channel), ``experts`` (each routed expert ranks as one unit, scored by the sum of its channels'
        normalised scores), ``kv`` (each key/value group of query heads ranks as one unit), ``experts+kv``.
    blocks: ``all`` or the block types that may be pruned, joined by ``+`` (``attention+mlp``;
        ``expert_mlp`` with ``group=experts`` prunes whole experts only); the others are kept whole.
    protect: layers never pruned: ``reference`` (outside ``range(int(0.1 * L), L - 1)``), ``none``, or a
        list such as ``0,1,2,29`` or ``0-2,29``.
    loss: calibration objective, a loss plugin: ``ntp`` (text), ``margin`` (multiple choice),
        ``answer_ntp`` (question/answer); ``gisp methods --all`` lists them (``gisp_plugin.importance.losses``).
    batch_size: sequences per forward/backward (reference 2); only memory and speed depend on it.
    gradient_checkpointing: recompute layer activations in backward: less activation memory for more time
        (SmolLM2, 4 x 256 tokens per micro-batch, CPU: peak RSS 3.4 -> 2.8 GiB, +16% time).

    Device and dtype are the model's (``gisp prune --device cuda --dtype bfloat16``); gradients are
    accumulated in float32 whatever the dtype. Only the prunable linear weights get gradients.
    """

    steps: int = 16
    normalize: Literal["reference", "param_mean", "block_mean", "none"] = "reference"
    protect: str = "reference"
    loss: str = "ntp"
    batch_size: int = 2
    gradient_checkpointing: bool = False
    group: str = "none"
    blocks: str = "all"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1 (1 is one-shot pruning)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        protected_layers(10**6, self.protect)  # syntax check; the range is checked against the model later
        unknown = set(self.groupings) - set(GROUPINGS)
        if unknown:
            raise ValueError(f"group={self.group!r}: give none, or {' / '.join(GROUPINGS)} joined by +")
        unknown = set(self.prunable_blocks or ()) - {"attention", *CHANNEL_BLOCKS}
        if unknown:
            raise ValueError(
                f"blocks={self.blocks!r}: give all, or block types joined by +: attention, {', '.join(CHANNEL_BLOCKS)}"
            )
        lookup("loss", self.loss)  # an unknown name fails here, listing the available losses

    @property
    def groupings(self) -> tuple[str, ...]:
        return () if self.group.strip().lower() in ("none", "") else tuple(p.strip() for p in self.group.split("+"))

    @property
    def prunable_blocks(self) -> set[str] | None:
        """The block types that may be pruned (``None``: all)."""
        return None if self.blocks.strip().lower() == "all" else {p.strip() for p in self.blocks.split("+")}


# --- protected layers and schedule -----------------------------------------------------------------------


def protected_layers(n_layers: int, protect: str | list[int] | tuple[int, ...]) -> list[int]:
    """The layer indices ``protect`` names for a model with ``n_layers`` decoder layers."""
    if isinstance(protect, list | tuple):
        layers = [int(i) for i in protect]
    elif protect == "reference":
        keep_range = range(int(0.1 * n_layers), n_layers - 1)
        return [i for i in range(n_layers) if i not in keep_range]
    elif protect.strip().lower() in ("none", ""):
        return []
    else:
        layers = []
        for part in protect.split(","):
            first, sep, last = part.strip().partition("-")
            try:
                layers += list(range(int(first), int(last) + 1)) if sep else [int(first)]
            except ValueError as err:
                raise ValueError(
                    f"protect={protect!r}: give 'reference', 'none' or layer indices such as 0,1,2,29 or 0-2,29"
                ) from err
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"protect={protect!r}: layer {bad[0]} does not exist (the model has layers 0..{n_layers - 1})")
    return sorted(set(layers))


def max_sparsity(anatomy: ModelAnatomy, options: GispOptions) -> float:
    """The largest reachable target: every structure of the unprotected layers pruned."""
    protected = set(protected_layers(len(anatomy.layers), options.protect))
    return anatomy.max_sparsity([i for i in range(len(anatomy.layers)) if i not in protected], options.prunable_blocks)


@dataclass(frozen=True)
class Cut:
    """One pruning decision: cut to ``sparsity`` with the scores of gradient step ``step``."""

    step: int
    sparsity: float
    target: float | None  # the user's target when this cut is one


def plan_cuts(targets: tuple[float, ...], steps: int) -> list[Cut]:
    """Linear schedule to the largest target in ``steps`` steps, with every target inserted as a cut."""
    top = max(targets)
    ends = [top if i == steps - 1 else top * (i + 1) / steps for i in range(steps)]
    cuts: list[Cut] = []
    for i, end in enumerate(ends):
        start = ends[i - 1] if i else 0.0
        inside = sorted(t for t in targets if start + 1e-12 < t <= end + 1e-12)
        cuts += [Cut(i, t, t) for t in inside]
        if not inside or abs(inside[-1] - end) > 1e-12:
            cuts.append(Cut(i, end, None))
    return cuts


# --- scores ----------------------------------------------------------------------------------------------


def structure_scores(model: nn.Module, anatomy: ModelAnatomy, sums: GradientSums) -> Scores:
    """Raw GISP scores per unit (float64): ``|W * g|`` summed over the weight matrices each unit owns.

    Biases are not scored (the reference scores weights only). A masked unit's gradient is zero, so
    its score is exactly zero.
    """

    def element_score(path: str, tensor: torch.Tensor) -> torch.Tensor:
        if path not in sums.grad:
            return torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
        return (tensor.detach().float() * sums.grad[path]).abs()

    return model_scores(model, anatomy, element_score)


def normalize_scores(
    model: nn.Module, anatomy: ModelAnatomy, raw: Scores, how: str, live: KeepMask, protected: list[int]
) -> Scores:
    """Block-wise normalisation ``how`` (see ``GispOptions.normalize``) of raw unit scores."""
    if how == "none":
        return dict(raw)
    out: Scores = {}
    if how == "block_mean":
        pools: dict[str, list[torch.Tensor]] = {}
        for (layer, name), values in raw.items():
            if layer not in protected:
                pools.setdefault(anatomy.kind(layer, name).block, []).append(values[live[layer, name]])
        means = {block: torch.cat(parts).mean() for block, parts in pools.items()}
        for (layer, name), values in raw.items():
            mean = means.get(anatomy.kind(layer, name).block, torch.tensor(0.0))
            out[layer, name] = values / mean if mean > 0 else values
        return out
    hidden = model.config.hidden_size
    for (layer, name), values in raw.items():
        kind = anatomy.kind(layer, name)
        if how == "param_mean":
            divisor = kind.params_per_unit
        elif kind.block == "attention":
            divisor = 4 * kind.owned[0].width * hidden  # 4 * head_dim * hidden_size, as the reference
        elif kind.block in CHANNEL_BLOCKS:
            divisor = 3 * kind.owned[0].per_stack(kind.count)  # 3 * intermediate_size (per expert), as the reference
        else:
            raise ValueError(f"normalize='reference' knows attention and MLP blocks, not {kind.block!r}; use param_mean")
        out[layer, name] = values / divisor
    return out


def ranking_scores(
    anatomy: ModelAnatomy, normalized: Scores, live: KeepMask, protected: list[int], blocks: set[str] | None = None
) -> Scores:
    """What the global ranking sees: protected units (and blocks not in ``blocks``) ``+inf``, already
    pruned units ``-1`` (first out)."""
    out: Scores = {}
    for (layer, name), values in normalized.items():
        ranked = torch.where(live[layer, name], values, torch.full_like(values, -1.0))
        frozen = layer in protected or (blocks is not None and anatomy.kind(layer, name).block not in blocks)
        out[layer, name] = torch.full_like(values, torch.inf) if frozen else ranked
    return out


def ranking_groups(anatomy: ModelAnatomy, groupings: tuple[str, ...]) -> Groups:
    """The units that rank together: a routed expert's channels (``experts``), a key/value group (``kv``)."""
    groups: Groups = {}
    for layer in anatomy.layers:
        for name, kind in layer.kinds.items():
            if "experts" in groupings and kind.router_rows is not None:
                groups[layer.index, name] = kind.router_rows.readers
            elif "kv" in groupings and kind.block == "attention" and kind.dependents:
                groups[layer.index, name] = kind.dependents[0].readers
    return groups


def group_scores(ranked: Scores, groups: Groups) -> Scores:
    """One score per group: the sum of its units' ranking scores (all pruned: -1, first out)."""
    out = dict(ranked)
    for key, members in groups.items():
        values = ranked[key]
        out[key] = torch.stack(
            [values[list(m)].sum() if bool((values[list(m)] >= 0).any()) else values.new_tensor(-1.0) for m in members]
        )
    return out


def step_scores(
    model: nn.Module,
    anatomy: ModelAnatomy,
    calibration: CalibrationSet,
    options: GispOptions,
    pad_token_id: int = 0,
    progress: str | None = None,
) -> tuple[Scores, GradientSums]:
    """One GISP scoring pass on the model as it is (masked or not): raw unit scores and the gradient sums."""
    sums = accumulate_gradients(
        model,
        weight_paths(anatomy),
        calibration,
        lookup("loss", options.loss),
        batch_size=options.batch_size,
        gradient_checkpointing=options.gradient_checkpointing,
        pad_token_id=pad_token_id,
        progress=progress,
    )
    return structure_scores(model, anatomy, sums), sums


# --- resume state ----------------------------------------------------------------------------------------


def run_fingerprint(job: PruningJob, cuts: list[Cut]) -> str:
    """A hash of everything a step's result depends on: weights, options, calibration data, cuts, seed."""
    digest = hashlib.sha256()
    for path in weight_paths(job.anatomy, include_dependents=True):
        tensor = weight_tensor(job.model, path).detach()
        digest.update(
            f"{path}:{tuple(tensor.shape)}:{float(tensor.double().sum())!r}:{float(tensor.double().abs().sum())!r}".encode()
        )
    calibration = job.calibration
    for sequence, mask, polarity in zip(calibration.sequences, calibration.loss_masks, calibration.polarity, strict=True):
        digest.update(sequence.to(torch.int64).numpy().tobytes() + mask.to(torch.uint8).numpy().tobytes())
        digest.update(str(polarity).encode())
    meta = {
        "options": options_to_dict(job.options),
        "calibration": calibration.name,
        "cuts": [(c.step, c.sparsity, c.target) for c in cuts],
        "seed": job.seed,
        "dtype": str(next(job.model.parameters()).dtype),
    }
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def load_state(work_dir: Path | None, fingerprint: str, anatomy: ModelAnatomy, cuts: list[Cut]) -> Trajectory | None:
    """The finished cuts of an interrupted identical run, if ``work_dir`` holds them; else ``None``."""
    path = Path(work_dir) / STATE_FILE if work_dir is not None else None
    if path is None or not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint:
            log.warning("ignoring %s: it is from a different run (model, options, data or targets differ); starting over", path)
            return None
        done = Trajectory.from_json(state["trajectory"], anatomy)
    except (ValueError, KeyError) as err:
        log.warning("ignoring unreadable %s (%s); starting over", path, err)
        return None
    finished = len(done.steps)
    if finished > len(cuts) or (0 < finished < len(cuts) and cuts[finished].step == cuts[finished - 1].step):
        log.warning("ignoring %s: it does not end at a step of this schedule; starting over", path)
        return None
    return done


def save_state(work_dir: Path | None, fingerprint: str, trajectory: Trajectory) -> None:
    """Write the finished steps atomically (a crash mid-write leaves the previous state intact)."""
    if work_dir is None:
        return
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = work_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": STATE_FORMAT, "fingerprint": fingerprint, "trajectory": trajectory.to_json()}))
    tmp.replace(work_dir / STATE_FILE)


# --- the method ------------------------------------------------------------------------------------------


def run(job: PruningJob) -> Iterator[Subnetwork]:
    """Prune iteratively to every target in ``job.targets``, yielding each subnetwork as it is reached."""
    options: GispOptions = job.options
    if job.calibration is None:
        raise ValueError("gisp needs calibration data")
    anatomy = job.anatomy
    protected = protected_layers(len(anatomy.layers), options.protect)
    groups = ranking_groups(anatomy, options.groupings)
    cuts = plan_cuts(job.targets, options.steps)
    fingerprint = run_fingerprint(job, cuts)
    pad_token_id = getattr(job.tokenizer, "pad_token_id", None) or 0

    keep = KeepMask.dense(anatomy)
    done = from_main(lambda: load_state(job.work_dir, fingerprint, anatomy, cuts))  # rank 0 reads, every rank resumes
    finished = len(done.steps) if done is not None else 0
    if finished:
        log.info("gisp: resuming from %s after %d of %d steps", job.work_dir, cuts[finished - 1].step + 1, options.steps)
    for index in range(finished):  # replay the finished cuts: same decisions, no gradients
        info = {k: v for k, v in done.steps[index].items() if k not in ("step", "sparsity")}
        keep = done.keep_at(index)
        job.trajectory.record(keep, done.steps[index]["sparsity"], **info)
        if cuts[index].target is not None:
            job.masked.apply(keep)
            yield job.subnetwork(cuts[index].target, keep, info=_subnetwork_info(info, options), elapsed_s=info.get("elapsed_s"))

    pending = sorted({cut.step for cut in cuts[finished:]})
    bar = tqdm(total=options.steps, initial=options.steps - len(pending), desc="GISP", unit="step", disable=not is_main_process())
    try:
        for step in pending:
            started = time.perf_counter()
            before = job.trajectory.steps[-1].get("elapsed_s", 0.0) if job.trajectory.steps else 0.0  # earlier runs too
            job.masked.apply(keep)
            torch.manual_seed(job.seed + step)
            sparsity = anatomy.sparsity(keep)
            try:
                desc = f"GISP step {step + 1}/{options.steps}"
                raw, sums = step_scores(job.model, anatomy, job.calibration, options, pad_token_id, desc)
            except NonFiniteError as err:
                raise NonFiniteError(f"gisp step {step + 1}/{options.steps} at sparsity {sparsity:.4f}: {err}") from err
            normalized = normalize_scores(job.model, anatomy, raw, options.normalize, keep, protected)
            ranked = group_scores(ranking_scores(anatomy, normalized, keep, protected, options.prunable_blocks), groups)
            reached = []
            for cut in (c for c in cuts if c.step == step):
                keep = prune_lowest_globally(anatomy, ranked, cut.sparsity, groups)
                info = {
                    "target": cut.target,
                    "scheduled": cut.sparsity,
                    "gradient_step": step,
                    "gradient_at_sparsity": sparsity,
                    "loss": sums.loss,
                    "step_time_s": time.perf_counter() - started,
                }
                info["elapsed_s"] = before + info["step_time_s"]
                job.trajectory.record(keep, anatomy.sparsity(keep), **info)
                if cut.target is not None:
                    reached.append((cut.target, keep, info))
            if is_main_process():
                save_state(job.work_dir, fingerprint, job.trajectory)
            bar.set_postfix(sparsity=f"{anatomy.sparsity(keep):.4f}", loss=f"{sums.loss:.4f}")
            bar.update(1)
            log.debug("gisp step %d/%d: loss %.4f at sparsity %.4f", step + 1, options.steps, sums.loss, sparsity)
            for target, reached_keep, info in reached:
                job.masked.apply(reached_keep)
                yield job.subnetwork(target, reached_keep, info=_subnetwork_info(info, options), elapsed_s=info["elapsed_s"])
    finally:
        bar.close()


def _subnetwork_info(info: dict, options: GispOptions) -> dict:
    return {"steps": options.steps, "gradient_step": info["gradient_step"], "calibration_loss": info["loss"]}


GISP = MethodSpec(
    name="gisp",
    description="Global iterative structured pruning: |W*g| Taylor scores, block-normalised, one global ranking, "
    "gradients recomputed on the masked model at every step (nested subnetworks)",
    run=run,
    options=GispOptions,
    calibration=CalibrationDefaults("c4", 2000, 256),
    nested=True,
    shardable=True,
    max_sparsity=max_sparsity,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [GISP]
