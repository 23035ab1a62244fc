"""What a comparison runs: model, methods, sparsities, calibration and evaluations, from flags or a file.

The embedded default (no model named) is the real SmolLM2-135M with offline data: the curated
``DEFAULT_METHODS`` at 20% and 40%, perplexity on held-apart Wikipedia text, sized to finish in minutes
on 2 CPU cores. ``methods: [all]`` (``--methods all``) runs every registered method instead.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from gisp_plugin.export.run import check_export_formats
from gisp_plugin.importance.shapes import check_shape
from gisp_plugin.inputs import InputError, check_fraction_list, check_int, check_name_list, check_text
from gisp_plugin.models.loading import DEFAULT_MODEL, parse_dtype
from gisp_plugin.pruning import check_targets

# The methods a comparison runs when none are named: GISP, the structured baselines and the two floors.
# A curated list, not "every registered method", so that installing more method plugins does not
# lengthen the default run; `--methods all` runs every registered one. OWL-sp is left out: it is Wanda-sp
# with outlier-weighted layer ratios, tied with it at both targets here (docs/results.md), and costs a
# fifth of the run.
DEFAULT_METHODS = ("gisp", "wanda_sp", "flap", "llm_pruner", "shortgpt", "magnitude", "random")
ALL_METHODS = "all"
# Sized so that `gisp compare` with no arguments finishes in about 5 minutes on 2 CPU cores (the run is
# model compute: every row scores these tokens). Perplexity only: a zero-shot task at a limit that fits
# (PIQA at 50 questions) has a standard error of 0.07, wider than the gaps between methods, so it is left
# to `--eval lm_eval:...` in a study. A study uses its own configuration.
DEFAULT_EVALS = ("perplexity:source=boolq-wiki,seqlen=128,max_windows=32",)
# Per-method options for the quick default: fewer GISP steps than a full run would use.
DEFAULT_METHOD_OPTIONS = {"gisp": {"steps": "4"}}


class ConfigError(InputError):
    """A comparison file or flag that cannot be used."""


@dataclass
class ComparisonConfig:
    """A whole comparison. ``methods`` empty means ``DEFAULT_METHODS``; ``["all"]`` every registered method.

    ``identity()`` lists what must match for results in one folder to be comparable: the model, its
    dtype, the seed and the calibration data. Methods, sparsities and evaluations may grow between runs.
    """

    model: str = DEFAULT_MODEL
    methods: list[str] = field(default_factory=list)
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {name: dict(options) for name, options in DEFAULT_METHOD_OPTIONS.items()}
    )
    sparsities: list[float] = field(default_factory=lambda: [0.2, 0.4])
    evals: list[str] = field(default_factory=lambda: list(DEFAULT_EVALS))
    calibration: str = "lambada-novels"
    n_samples: int = 16
    seqlen: int = 128
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    save_models: bool = False
    pad_to: int | None = None  # None: 64 on CUDA, 1 (no padding) elsewhere
    quantize: list[str] = field(default_factory=list)  # METHOD:QUANT rows, e.g. gisp:int8wo, dense:int8wo
    export: list[str] = field(default_factory=list)  # formats every saved model is also exported to (gguf, ...)
    shape: str = "free"  # shape constraint of every method's allocation (gisp_plugin.importance.shapes)

    def __post_init__(self) -> None:
        """Check every field's type and range (a config file may hold anything), normalising lists."""
        self.model = check_text("model", self.model)
        self.methods = check_name_list("methods", self.methods)  # empty: DEFAULT_METHODS; [all]: every one
        if ALL_METHODS in self.methods and len(self.methods) > 1:
            raise ConfigError(f"methods {self.methods!r}: give either 'all' or method names, not both")
        self.quantize = check_name_list("quantize", self.quantize)
        if not isinstance(self.method_options, dict):
            raise ConfigError(
                f"method_options must map method names to options, e.g. {{gisp: {{steps: 4}}}}; got {self.method_options!r}"
            )
        for method, options in self.method_options.items():
            if not isinstance(method, str) or not isinstance(options, dict):
                raise ConfigError(
                    f"method_options[{method!r}] must be a mapping of option names to values, e.g. {{steps: 4}}; got {options!r}"
                )
        if isinstance(self.sparsities, str):
            try:
                self.sparsities = [float(s) for s in self.sparsities.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"sparsities {self.sparsities!r} must be numbers like 0.2,0.4") from None
        self.sparsities = check_fraction_list("sparsities", self.sparsities)
        check_targets(self.sparsities, reachable=1.0)
        self.evals = check_name_list("evals", [self.evals] if isinstance(self.evals, str) else self.evals)
        if not self.evals:
            raise ConfigError("evals must name at least one evaluation, e.g. ['perplexity:source=boolq-wiki,seqlen=128']")
        self.calibration = check_text("calibration", self.calibration)
        check_int("n_samples", self.n_samples, 1)
        check_int("seqlen", self.seqlen, 2)
        check_int("seed", self.seed, 0)
        if self.pad_to is not None:
            check_int("pad_to", self.pad_to, 1)
        self.device = check_text("device", self.device)
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"unknown device {self.device!r}; give cpu, cuda, cuda:N or mps") from None
        parse_dtype(check_text("dtype", self.dtype))
        check_shape(self.shape)
        if not isinstance(self.save_models, bool):
            raise ConfigError(f"save_models must be true or false, got {self.save_models!r}")
        self.export = check_export_formats(self.export)  # the same check as gisp prune --export
        if self.export and not self.save_models:
            raise ConfigError("export writes beside the saved models: set save_models (--save-models) too")

    def identity(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "seed": self.seed,
            "calibration": self.calibration,
            "n_samples": self.n_samples,
            "seqlen": self.seqlen,
        } | ({"shape": self.shape} if self.shape != "free" else {})  # folders written before shapes stay valid

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> ComparisonConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in {source}; valid keys: {', '.join(sorted(names))}")
        try:
            return cls(**data)
        except ValueError as err:  # InputError, TargetError, ConfigError: say where the bad value came from
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: Path) -> ComparisonConfig:
        """Read a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON comparison file."""
        if not path.is_file():
            raise ConfigError(f"no comparison file at {str(path)!r}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read {str(path)!r}: {err}") from None
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text) or {}
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise ConfigError(f"comparison file {str(path)!r} must end in .yaml, .yml, .toml or .json")
        except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as err:
            first = " ".join(str(err).split())  # YAML errors span several lines
            raise ConfigError(f"cannot parse {str(path)!r}: {first}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{str(path)!r} must hold a mapping of settings")
        return cls.from_mapping(data, str(path))
