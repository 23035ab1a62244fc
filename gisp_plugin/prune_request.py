"""What one ``gisp prune`` run asks for, as one typed value checked once: ``PruneRequest``.

The command line turns its flags into a ``PruneRequest`` at its edge; a Python caller builds one directly;
``gisp_plugin.prune_job.prune`` runs it. Every check that needs no model runs in the constructor (method and
options, targets, dtype, device, attention, calibration, quantisation, exports, recovery, ranks and sharding,
the model folder's structures read from its ``config.json``, data sources, sequence lengths, the output
folder), so an invalid request never exists and fails with the same one line whichever entry built it.
What needs the loaded model is checked by ``gisp_plugin.pruning.check_run`` once it is loaded.

The checks are the ones ``gisp compare``'s ``ComparisonConfig`` uses where both check the same thing
(``gisp_plugin.inputs``, ``check_targets``, ``parse_dtype``, ``check_shape``, ``check_export_formats``,
``check_split``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import check_data_source
from gisp_plugin.deploy.padding import default_pad_to
from gisp_plugin.deploy.quantize import QuantChoice, check_quantization
from gisp_plugin.distributed.context import DistributedSetup, check_split, launch_setup
from gisp_plugin.export.api import ExportOptions
from gisp_plugin.export.run import check_export_formats
from gisp_plugin.importance.shapes import check_shape
from gisp_plugin.inputs import (
    InputError,
    check_attention,
    check_device,
    check_int,
    check_output_folder,
    check_seqlen,
    folder_context_limit,
)
from gisp_plugin.methods.api import MethodSpec
from gisp_plugin.methods.options import options_to_dict
from gisp_plugin.models.loading import parse_dtype
from gisp_plugin.pruning import check_before_loading, check_targets, resolve_method

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneRequest:
    """One pruning run: a method, its targets and what to write, checked when it is built.

    ``model`` is a hub id, a local folder or ``smollm2-135m``; ``method`` a registered method name and
    ``options`` its options (``{"steps": "16"}``: strings as on the command line, or typed values);
    ``targets`` the sparsities (sorted and deduplicated here); ``out`` the run folder. ``calibration``,
    ``n_samples`` and ``seqlen`` left ``None`` take the method's own default, field by field. ``pad_to``
    ``None`` becomes 64 on CUDA and 1 elsewhere. ``export`` names formats (a list or a comma-separated
    string) written beside every saved model with ``export_options``; ``quantize`` a torchao choice
    (``int8wo``, ``int4wo:group_size=64``, ...). ``recover_steps`` > 0 runs LoRA recovery on each compacted
    model. ``fsdp`` and ``cpu_offload`` shard the model under torchrun. ``overwrite`` replaces an ``out``
    folder that holds another run.

    The constructor resolves what the run needs: ``spec`` and ``method_options`` (the parsed options),
    ``data`` (the calibration request, ``None`` for a method that uses none), ``recovery_data`` and
    ``quantization``.
    """

    model: str
    method: str
    targets: Sequence[float]
    out: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    shape: str = "free"
    device: str = "cpu"
    dtype: str = "float32"
    attn: str | None = None
    seed: int = 0
    calibration: str | None = None
    n_samples: int | None = None
    seqlen: int | None = None
    pad_to: int | None = None
    quantize: str | None = None
    export: Sequence[str] | str | None = ()
    export_options: ExportOptions = field(default_factory=ExportOptions)
    trajectory_only: bool = False
    recover_steps: int = 0
    overwrite: bool = False
    fsdp: bool = False
    cpu_offload: bool = False

    spec: MethodSpec = field(init=False, repr=False, compare=False)
    method_options: Any = field(init=False, repr=False, compare=False)
    data: CalibrationRequest | None = field(init=False, compare=False)
    recovery_data: CalibrationRequest | None = field(init=False, compare=False)
    quantization: QuantChoice | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        """Every check that needs no model, in the order the command line has always reported them."""
        self._check_types()
        spec, parsed = resolve_method(self.method, dict(self.options))
        self._set(spec=spec, method_options=parsed, options=dict(self.options))
        self._set(targets=check_targets(self.targets, reachable=1.0))
        check_shape(self.shape)
        if self.trajectory_only and not spec.nested:
            raise ValueError(f"method {self.method!r} is not nested; --trajectory-only needs a nested method")
        parse_dtype(self.dtype)
        check_device(self.device)
        check_attention(self.attn)
        data = calibration_for(spec, self.calibration, self.n_samples, self.seqlen, self.seed)
        if data is None and not self.recover_steps and (self.calibration, self.n_samples, self.seqlen) != (None,) * 3:
            log.warning("method %r uses no calibration data: --calibration, --n-samples and --seqlen are not used", spec.name)
        self._set(data=data, quantization=check_quantization(self.quantize, self.device, self.dtype))
        self._set(export=tuple(check_export_formats(self.export)))
        if self.export and self.quantize:
            raise InputError(
                "--export reads unquantised weights and engines quantise their own way: drop --quantize, "
                "and use --type q8_0 (or f16/bf16) for a smaller GGUF"
            )
        self._set(pad_to=default_pad_to(self.device, self.pad_to))
        self._set(recovery_data=self._recovery_data())
        launch = launch_setup()
        if self.data is not None:  # under torchrun every rank needs at least one calibration sequence
            check_split(f"--n-samples {self.data.n_samples}", self.data.n_samples, launch.world_size)
        self._check_sharding(launch)
        check_before_loading(self.model, self.method, self.targets, self.options)  # steps and reach, from config.json alone
        limit = folder_context_limit(self.model) if Path(self.model).expanduser().is_dir() else None
        for what, request in (("calibration", self.data), ("recovery", self.recovery_data)):
            if request is not None:
                check_data_source(request.source)  # an unknown name, a missing file or an offline hub dataset fails here
                check_seqlen(what, request.seqlen, limit, self.model)
        check_output_folder(self.out, "--out folder")

    def _set(self, **values: Any) -> None:
        """Normalised and derived fields, written once while the (frozen) request is built."""
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _check_types(self) -> None:
        """What a Python caller may get wrong that the command line's parsers rule out (values the command
        line can give are left to the checks that follow, which name them as they always have)."""
        self._set(model=str(self.model) if isinstance(self.model, Path) else self.model)
        for name in ("model", "method"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("calibration", "quantize", "attn"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise InputError(f"{name} must be a string or None, got {getattr(self, name)!r}")
        if not isinstance(self.out, (str, Path)):
            raise InputError(f"out must be a folder path, got {self.out!r}")
        self._set(out=Path(self.out))
        if not isinstance(self.options, Mapping):
            raise InputError(f"options must map option names to values, e.g. {{'steps': 16}}; got {self.options!r}")
        check_int("seed", self.seed, 0)
        check_int("recover_steps", self.recover_steps, 0)
        for name, minimum in (("n_samples", 1), ("seqlen", 2), ("pad_to", 1)):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum)
        for name in ("trajectory_only", "overwrite", "fsdp", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.export_options, ExportOptions):
            raise InputError(f"export_options must be an ExportOptions, got {self.export_options!r}")

    def _recovery_data(self) -> CalibrationRequest | None:
        """The data LoRA recovery trains on: the method's calibration request, or the user's own source."""
        if not self.recover_steps:
            return None
        if self.data is not None:
            return self.data
        if self.calibration is None:
            raise ValueError(f"method {self.method!r} uses no data; give --calibration SOURCE for --recover-steps")
        return CalibrationRequest(self.calibration, _given(self.n_samples, 128), _given(self.seqlen, 128), self.seed)

    def _check_sharding(self, launch: DistributedSetup) -> None:
        """``fsdp`` needs torchrun with several ranks and a method that scores sharded models."""
        if self.cpu_offload and not self.fsdp:
            raise InputError("--cpu-offload keeps FSDP shards in CPU memory; give it together with --fsdp")
        if not self.fsdp:
            return
        if not launch.enabled:
            raise InputError("--fsdp shards the model across ranks: launch with torchrun --nproc-per-node N (N >= 2)")
        if not self.spec.shardable:
            raise InputError(
                f"method {self.spec.name!r} does not run on a model sharded with --fsdp; "
                "run it data parallel (torchrun without --fsdp)"
            )
        why = self.spec.sharded_refusal(self.method_options) if self.spec.sharded_refusal else None
        if why:
            raise InputError(f"method {self.spec.name!r}: {why}; run it data parallel (torchrun without --fsdp)")

    def record(self) -> dict[str, Any]:
        """What makes two runs the same run (``run.json``): rerunning it into its folder resumes instead of refusing.

        The ranks and the sharding are left out, so a run started on N ranks resumes on M.
        """
        model = str(Path(self.model).expanduser().resolve()) if Path(self.model).expanduser().exists() else self.model
        return {
            "model": model,
            "method": self.method,
            "options": options_to_dict(self.method_options),
            "targets": list(self.targets),
            "calibration": self.data.label if self.data else None,
            "seed": self.seed,
            "dtype": str(parse_dtype(self.dtype)).removeprefix("torch."),
            "pad_to": self.pad_to,
            "quantize": self.quantize,
            "trajectory_only": self.trajectory_only,
            "recover_steps": self.recover_steps,
            "recovery_data": self.recovery_data.label if self.recovery_data else None,
            "export": ",".join(self.export) or None,
        } | ({"shape": self.shape} if self.shape != "free" else {})  # free runs resume from folders written before shapes


def _given(value, default):
    """``value`` unless it was not given (``None``); 0 and "" are values, never replaced by the default."""
    return default if value is None else value


def calibration_for(
    spec: MethodSpec, source: str | None, n_samples: int | None, seqlen: int | None, seed: int = 0
) -> CalibrationRequest | None:
    """The user's calibration choice, falling back field by field on the method's reference default
    (``None`` for a method that uses no data)."""
    default = spec.default_calibration_request(seed)
    if default is None:
        return None
    return CalibrationRequest(
        source=_given(source, default.source),
        n_samples=_given(n_samples, default.n_samples),
        seqlen=_given(seqlen, default.seqlen),
        seed=seed,
    )
