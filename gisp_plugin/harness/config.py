"""What a comparison runs: model, methods, sparsities, calibration and evaluations, from flags or a file.

The embedded default (no model named) is the real SmolLM2-135M with offline data: every registered
method at 20% and 40%, perplexity on held-apart Wikipedia text plus two zero-shot tasks at a small
limit, sized to finish in minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gisp_plugin.models.loading import DEFAULT_MODEL

DEFAULT_EVALS = (
    "perplexity:source=boolq-wiki,seqlen=128,max_windows=48",
    "lm_eval:tasks=piqa+arc_easy,limit=50",
)
# Per-method options for the quick default: fewer GISP steps than a full run would use.
DEFAULT_METHOD_OPTIONS = {"gisp": {"steps": "4"}}


class ConfigError(ValueError):
    """A comparison file or flag that cannot be used."""


@dataclass
class ComparisonConfig:
    """A whole comparison. ``methods`` empty means every registered method.

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
    n_samples: int = 32
    seqlen: int = 128
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    save_models: bool = False
    pad_to: int | None = None  # None: 64 on CUDA, 1 (no padding) elsewhere
    quantize: list[str] = field(default_factory=list)  # METHOD:QUANT rows, e.g. gisp:int8wo, dense:int8wo

    def identity(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "seed": self.seed,
            "calibration": self.calibration,
            "n_samples": self.n_samples,
            "seqlen": self.seqlen,
        }

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "config") -> ComparisonConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in {source}; valid keys: {', '.join(sorted(names))}")
        values = dict(data)
        if isinstance(values.get("methods"), str):
            values["methods"] = [m.strip() for m in values["methods"].split(",") if m.strip()]
        if isinstance(values.get("quantize"), str):
            values["quantize"] = [q.strip() for q in values["quantize"].split(",") if q.strip()]
        if isinstance(values.get("sparsities"), str):
            values["sparsities"] = [float(s) for s in values["sparsities"].split(",") if s.strip()]
        return cls(**values)

    @classmethod
    def from_file(cls, path: Path) -> ComparisonConfig:
        """Read a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON comparison file."""
        if not path.exists():
            raise ConfigError(f"no comparison file at {str(path)!r}")
        text = path.read_text()
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
            raise ConfigError(f"cannot parse {str(path)!r}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{str(path)!r} must hold a mapping of settings")
        return cls.from_mapping(data, str(path))
