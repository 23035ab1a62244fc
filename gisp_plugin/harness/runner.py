"""Run a comparison: methods x sparsities x evaluations on identical loops.

The dense model and the calibration set are loaded once and shared; every method starts from the same
dense weights (the loop hands them back untouched); the dense model is evaluated as the 0% row.
Every pruning run and every evaluation is cached, so an interrupted or extended comparison redoes
nothing that is finished.

Under ``torchrun`` every rank loads the model and the data; the methods not yet in the cache are pruned
data parallel by all ranks together (rank 0 decides which, and alone writes the cache), then the ranks
leave the group: the others exit and rank 0 evaluates every row alone, exactly as one process would, from
the cache. Evaluation is not split across ranks: it runs once, on rank 0, after all pruning is done, so
no rank waits in a collective while rank 0 evaluates.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.checkpoint.locking import hold_folder
from gisp_plugin.checkpoint.saving import count_params, save_pruned
from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import check_data_source, load_calibration
from gisp_plugin.deploy.padding import default_pad_to
from gisp_plugin.deploy.quantize import QuantChoice, parse_row_quantizations, quantization_info, quantized_copy
from gisp_plugin.deploy.size import serialized_bytes, size_metrics
from gisp_plugin.distributed.context import (
    DistributedSetup,
    check_split,
    current_setup,
    device_for,
    init_distributed,
    is_main_process,
    launch_setup,
    leave_distributed,
)
from gisp_plugin.distributed.data_parallel import from_main
from gisp_plugin.evaluation.specs import EvalSpec, check_spec_inputs, parse_eval_specs, run_spec
from gisp_plugin.export.api import ExportOptions
from gisp_plugin.export.native import saved_form
from gisp_plugin.export.run import export_beside
from gisp_plugin.harness.cache import ResultCache
from gisp_plugin.harness.config import ALL_METHODS, DEFAULT_METHODS, ComparisonConfig, ConfigError
from gisp_plugin.harness.memory import PeakMemory
from gisp_plugin.harness.progress import ComparisonProgress
from gisp_plugin.harness.report import row_line
from gisp_plugin.inputs import check_device, check_output_folder, check_seqlen, context_limit, folder_context_limit
from gisp_plugin.methods.api import Subnetwork
from gisp_plugin.methods.options import options_to_dict
from gisp_plugin.models.loading import load_model
from gisp_plugin.plugins.manager import registered
from gisp_plugin.pruning import check_targets, compact_subnetwork, pruning_record, resolve_method, run_method

log = logging.getLogger(__name__)

SETTINGS_FILE = "comparison.json"


@dataclass
class Row:
    """One model in the table: a method at a sparsity (the dense model is method ``dense`` at 0)."""

    method: str
    target: float
    sparsity: float
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodCost:
    """Wall time and peak memory of one method's pruning run (all targets)."""

    method: str
    prune_time_s: float
    time_per_subnetwork_s: float
    peak_memory_bytes: int
    cached: bool


@dataclass
class ComparisonResult:
    config: ComparisonConfig
    rows: list[Row]
    costs: list[MethodCost]
    eval_settings: dict[str, Any]


def check_results_folder(out: Path, config: ComparisonConfig) -> None:
    """Refuse a folder whose earlier results used another model, dtype, seed or calibration, or that
    holds files of something else. A settings file without any cached result (a run that failed
    before finishing anything) blocks nothing: it is replaced."""
    check_output_folder(out, "--out folder")
    settings = out / SETTINGS_FILE
    if not settings.exists():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out folder {str(out)!r} is not empty and holds no comparison; choose a new or empty folder")
        return
    if not ResultCache(out / "cache").has_entries():
        return
    try:
        earlier = json.loads(settings.read_text())["identity"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ConfigError(f"{settings} is not a comparison settings file; choose another --out") from err
    if earlier != config.identity():
        changed = sorted(k for k in earlier if earlier.get(k) != config.identity().get(k))
        raise ConfigError(
            f"{str(out)!r} holds results of a different configuration ({', '.join(changed)} differ: "
            f"{ {k: earlier[k] for k in changed} }); use another --out folder to keep both"
        )


def resolve_methods(config: ComparisonConfig) -> dict[str, Any]:
    """Method name -> parsed options, checked before any work starts."""
    available = list(registered("method"))
    if config.methods == [ALL_METHODS]:
        names = available
    elif config.methods:
        names = config.methods
    else:  # the curated default; one whose plugin is not installed is left out
        names = [name for name in DEFAULT_METHODS if name in available]
    unknown = sorted(set(config.method_options) - set(available))
    if unknown:
        raise ConfigError(f"options given for unknown method {unknown[0]!r}; available: {', '.join(available)}")
    for name, options in config.method_options.items():  # options of a method not run now are still checked
        if name not in names:
            resolve_method(name, options)
    return {name: resolve_method(name, config.method_options.get(name, {}))[1] for name in names}


def _subnetworks_to_json(subnetworks: list[Subnetwork], times: list[float]) -> list[dict[str, Any]]:
    return [
        {"target": s.target, "sparsity": s.sparsity, "keep": s.keep.to_json(), "info": s.info, "elapsed_s": t}
        for s, t in zip(subnetworks, times, strict=True)
    ]


def _subnetwork_tensors(subnetworks: list[Subnetwork]) -> dict[str, torch.Tensor]:
    """The tensors of every subnetwork, by name: ``"{i}:{module}"`` an extra bias, ``"{i}:updated:{tensor}"`` an
    updated weight of subnetwork ``i``."""
    tensors = {f"{i}:{path}": b for i, s in enumerate(subnetworks) for path, b in s.extra_biases.items()}
    tensors.update({f"{i}:updated:{path}": w for i, s in enumerate(subnetworks) for path, w in s.updated_weights.items()})
    return tensors


def _subnetworks_from_json(entries, anatomy, tensors: dict[str, torch.Tensor]) -> list[Subnetwork]:
    out = []
    for i, e in enumerate(entries):
        mine = {name.split(":", 1)[1]: t for name, t in tensors.items() if name.split(":", 1)[0] == str(i)}
        extra = {name: t for name, t in mine.items() if not name.startswith("updated:")}
        updated = {name.removeprefix("updated:"): t for name, t in mine.items() if name.startswith("updated:")}
        keep = KeepMask.from_json(anatomy, e["keep"])
        out.append(Subnetwork(e["target"], keep, e["sparsity"], extra, e["info"], updated_weights=updated))
    return out


class Comparison:
    """Holds the shared dense model, calibration set and cache while a comparison runs."""

    def __init__(self, config: ComparisonConfig, out: Path):
        self.config = config
        self.out = out
        self.cache = ResultCache(out / "cache")
        self.methods = resolve_methods(config)
        self.targets = check_targets(config.sparsities, reachable=1.0)
        self.specs: list[EvalSpec] = parse_eval_specs(config.evals)
        check_device(config.device)
        self._check_data(folder_context_limit(config.model) if Path(config.model).expanduser().is_dir() else None, True)
        self.quantize = parse_row_quantizations(config.quantize, list(self.methods), config.device, config.dtype)
        self.pad_to = default_pad_to(config.device, config.pad_to)
        check_results_folder(out, config)
        if any(self._needs_data(m) for m in self.methods):  # the same check as gisp prune's
            check_split(f"n_samples={config.n_samples}", config.n_samples, launch_setup().world_size)
        self.model, self.tokenizer = load_model(config.model, device_for(launch_setup(), config.device), config.dtype)
        self._check_data(context_limit(self.model.config), False)  # a hub model's context is known only now
        self._keep_applicable_methods()
        self._calibration = None
        self.distributed = DistributedSetup()  # the setup that pruned this run's methods

    def _keep_applicable_methods(self) -> None:
        """Every named method must apply to the model (REAP needs routed experts); when no method is named,
        the default or ``all`` ones that do not apply are left out, with a log line."""
        anatomy = adapter_for(self.model).anatomy(self.model)
        for name, parsed in list(self.methods.items()):
            spec = resolve_method(name, self.config.method_options.get(name, {}))[0]
            if spec.check_options is not None:  # the user's options must fit the model, named or not
                try:
                    spec.check_options(anatomy, parsed)
                except ValueError as err:
                    raise ConfigError(f"{name} options do not fit {self.config.model!r}: {err}") from None
            try:
                if spec.max_sparsity is not None:
                    spec.max_sparsity(anatomy, parsed)
            except ValueError as err:
                if self.config.methods and self.config.methods != [ALL_METHODS]:
                    raise ConfigError(f"method {name!r} does not apply to {self.config.model!r}: {err}") from None
                log.info("leaving out %s: %s", name, err)
                del self.methods[name]

    def _needs_data(self, method: str) -> bool:
        return resolve_method(method, self.config.method_options.get(method, {}))[0].calibration is not None

    def _check_data(self, context: int | None, data: bool) -> None:
        """Data sources exist (with ``data``) and every sequence length fits the model's ``context``."""
        if any(self._needs_data(m) for m in self.methods):
            if data:
                check_data_source(self.config.calibration)
            check_seqlen("calibration", self.config.seqlen, context, self.config.model)
        check_spec_inputs(self.specs, context, self.config.model, data)

    def calibration(self):
        """Loaded on first use and shared by every method that needs data."""
        if self._calibration is None:
            c = self.config
            request = CalibrationRequest(c.calibration, c.n_samples, c.seqlen, c.seed)
            self._calibration = load_calibration(request, self.tokenizer)
        return self._calibration

    def base_key(self) -> dict[str, Any]:
        return {"identity": self.config.identity()}

    def prune_key(self, method: str) -> dict[str, Any]:
        return {**self.base_key(), "method": method, "options": options_to_dict(self.methods[method]), "targets": self.targets}

    def evaluate(self, model, key: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any], bool]:
        """Metrics and details of every evaluation of ``model``, and whether all of them came from the cache."""
        metrics, details, cached = {}, {}, True
        for spec in self.specs:
            eval_key = {**key, "eval": spec.text}
            entry = self.cache.get("eval", eval_key)
            if entry is None:
                cached = False
                result = run_spec(spec, model, self.tokenizer)
                entry = {"metrics": result.metrics, "details": result.details}
                self.cache.put("eval", eval_key, entry)
            metrics.update(entry["metrics"])
            details[spec.text] = entry["details"]
        return metrics, details, cached

    def size(self, model, key: dict[str, Any]) -> dict[str, float]:
        """Size of the saved weights (safetensors tensors) and bytes per parameter; cached like the evaluations."""
        size_key = {**key, "size": "safetensors"}
        entry = self.cache.get("size", size_key)
        if entry is None:
            entry = size_metrics(serialized_bytes(model), count_params(model)["total"])
            self.cache.put("size", size_key, entry)
        return entry

    def variants(self, method: str, model) -> Iterator[tuple[QuantChoice | None, Any]]:
        """The model itself, then a quantised copy for each quantisation asked for ``method``."""
        yield None, model
        for choice in self.quantize.get(method, []):
            yield choice, quantized_copy(model, choice)

    def prune(self, method: str) -> tuple[list[Subnetwork], MethodCost]:
        """The subnetworks of ``method`` at every target and what they cost: from the cache, else pruned now."""
        cached = self.cached_prune(method)
        return cached if cached is not None else self.prune_and_cache(method)

    def cached_prune(self, method: str) -> tuple[list[Subnetwork], MethodCost] | None:
        key = self.prune_key(method)
        entry = self.cache.get("prune", key)
        biases = self.cache.get_tensors("prune", key) if entry is not None else None
        if entry is None or biases is None:  # a damaged tensors file is dropped: prune again
            return None
        anatomy = adapter_for(self.model).anatomy(self.model)
        subnetworks = _subnetworks_from_json(entry["subnetworks"], anatomy, biases)
        cost = MethodCost(method, entry["prune_time_s"], entry["time_per_subnetwork_s"], entry["peak_memory_bytes"], True)
        return subnetworks, cost

    def prune_data_parallel(self, setup: DistributedSetup, progress: ComparisonProgress) -> None:
        """Every rank prunes, together, the methods rank 0 finds missing from the cache; then the ranks leave
        the group (rank 0 goes on alone, reading them from the cache)."""
        missing = from_main(lambda: [m for m in self.methods if self.cached_prune(m) is None], setup)
        for method in missing:
            progress.stage(f"{method}: pruning on {setup.world_size} ranks")
            self.prune_and_cache(method)
        self.distributed = setup
        leave_distributed()

    def prune_and_cache(self, method: str) -> tuple[list[Subnetwork], MethodCost]:
        """Run ``method`` (data parallel under torchrun) and cache its subnetworks (rank 0 writes)."""
        key = self.prune_key(method)
        spec, _ = resolve_method(method, self.config.method_options.get(method, {}))
        calibration = self.calibration() if spec.calibration is not None else None
        subnetworks, times = [], []
        with PeakMemory(self.model) as memory:
            for subnetwork in run_method(
                self.model,
                self.tokenizer,
                method,
                self.targets,
                self.config.method_options.get(method, {}),
                calibration,
                self.config.seed,
                work_dir=self.out / "work" / method,
                shape=self.config.shape,
            ):
                subnetworks.append(subnetwork)
                times.append(subnetwork.elapsed_s)  # the method's own time, with steps finished before a resume
        elapsed = times[-1]
        cost = MethodCost(method, elapsed, elapsed / len(subnetworks), memory.peak_bytes, False)
        if not is_main_process():
            return subnetworks, cost
        self.cache.put_tensors("prune", key, _subnetwork_tensors(subnetworks))
        self.cache.put(
            "prune",
            key,
            {
                "subnetworks": _subnetworks_to_json(subnetworks, times),
                "prune_time_s": cost.prune_time_s,
                "time_per_subnetwork_s": cost.time_per_subnetwork_s,
                "peak_memory_bytes": cost.peak_memory_bytes,
            },
        )
        return subnetworks, cost

    def save(
        self,
        method: str,
        subnetwork: Subnetwork,
        model,
        params: dict[str, int],
        choice: QuantChoice | None,
        row: Row,
        layers: list[dict],
        form: dict[str, str],
    ):
        """Save a compared model with its record and a model card holding its results, and export it as asked."""
        record = pruning_record(
            self.config.model,
            method,
            self.methods[method],
            subnetwork,
            model,
            params,
            self.calibration().name if self._calibration else None,
            self.config.seed,
            self.distributed,
            layers,
            self.config.shape,
        )
        record.info["pad_to"] = self.pad_to
        record.info["saved_form"] = form
        name = f"{method}-s{subnetwork.target:.2f}"
        if choice is not None:
            record.info["quantization"] = quantization_info(choice)
            name += f"-{choice.slug}"
        results = {f"gisp compare ({', '.join(self.config.evals)})": row.metrics}
        saved = save_pruned(model, self.tokenizer, self.out / "models" / name, record, results)
        if self.config.export and choice is None:  # engines take their own quantisation (GGUF types), not torchao's
            export_beside(saved, self.config.export, ExportOptions())

    def run(self, progress: ComparisonProgress | None = None) -> ComparisonResult | None:
        """Evaluate the dense model, then prune with every method and evaluate every subnetwork, each
        also quantised as asked (``METHOD:QUANT`` rows).

        ``progress`` shows rows done, the step running and one line per finished row (default: log lines).
        Under torchrun the ranks first prune together (``prune_data_parallel``); ranks other than 0 then
        return ``None``.
        """
        if any(self.cache.get("prune", self.prune_key(m)) is None and self._needs_data(m) for m in self.methods):
            self.calibration()  # data too short or unavailable fails here, before the folder is written to
        progress = progress or ComparisonProgress()
        setup = current_setup()
        if setup.enabled:
            self.prune_data_parallel(setup, progress)
            if not setup.is_main:
                return None
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / SETTINGS_FILE).write_text(
            json.dumps({"identity": self.config.identity(), "config": self.config.to_json()}, indent=1)
        )
        rows, costs = [], []
        targets = ", ".join(f"{t:.0%}" for t in self.targets)
        n_rows = 1 + len(self.quantize.get("dense", []))
        n_rows += sum((1 + len(self.quantize.get(m, []))) * len(self.targets) for m in self.methods)
        progress.start(n_rows)
        try:
            progress.stage("dense: evaluating")
            started = time.perf_counter()
            for choice, model in self.variants("dense", self.model):
                key = {**self.base_key(), "method": "dense", **({"quantize": choice.label} if choice else {})}
                metrics, details, cached = self.evaluate(model, key)
                metrics.update(self.size(model, key))
                rows.append(Row(_row_name("dense", choice), 0.0, 0.0, metrics, details))
                progress.row_done(row_line(rows[-1], time.perf_counter() - started, cached))
                started = time.perf_counter()
            for method in self.methods:
                progress.stage(f"{method} {targets}: pruning")
                subnetworks, cost = self.prune(method)
                costs.append(cost)
                for subnetwork in subnetworks:
                    progress.stage(f"{method} {subnetwork.target:.0%}: evaluating")
                    started = time.perf_counter()
                    compact, params = compact_subnetwork(self.model, subnetwork, self.pad_to)
                    sparsity = 1 - params["decoder"] / params["decoder_dense"]
                    layers, form = getattr(compact.config, "pruned_layers", []), None
                    if self.config.save_models:  # evaluate what is saved: the family's own model where it is exact
                        compact, form = saved_form(compact)
                    for choice, model in self.variants(method, compact):
                        key = {
                            **self.prune_key(method),
                            "target": subnetwork.target,
                            **({"quantize": choice.label} if choice else {}),
                        }
                        metrics, details, cached = self.evaluate(model, key)
                        metrics.update(self.size(model, key))
                        rows.append(Row(_row_name(method, choice), subnetwork.target, sparsity, metrics, details))
                        progress.row_done(row_line(rows[-1], time.perf_counter() - started, cached))
                        started = time.perf_counter()
                        if self.config.save_models:
                            self.save(method, subnetwork, model, params, choice, rows[-1], layers, form)
                        del model
                    del compact
        finally:
            progress.close()
        eval_settings = {spec.text: rows[0].details.get(spec.text, {}) for spec in self.specs}
        return ComparisonResult(self.config, rows, costs, eval_settings)


def _row_name(method: str, choice: QuantChoice | None) -> str:
    return method if choice is None else f"{method}+{choice.label}"


def run_comparison(
    config: ComparisonConfig | dict[str, Any], out: str | Path, progress: ComparisonProgress | None = None
) -> ComparisonResult | None:
    """Check everything, then run (or resume) the comparison into ``out`` (a config or its mapping).

    Under torchrun the ranks join one job once every rank has checked its inputs and loaded the model;
    ranks other than 0 return ``None`` when the pruning is done (see the module docstring).
    """
    if isinstance(config, dict):
        config = ComparisonConfig.from_mapping(config, "the comparison mapping")
    if not isinstance(config, ComparisonConfig):
        raise ConfigError(f"run_comparison needs a ComparisonConfig or a mapping, got {type(config).__name__}")
    lock = hold_folder(out, fix="wait for it to finish, or give another --out") if is_main_process() else nullcontext()
    with lock:  # one comparison writes into ``out`` at a time (rank 0 writes; the other ranks only prune)
        comparison = Comparison(config, Path(out))
        init_distributed(config.device)
        return comparison.run(progress)
