"""Method options: typed dataclasses, filled from user strings (``--option steps=16``) or config files."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class OptionError(ValueError):
    """An option name or value a method does not accept."""


def _as_text(name: str, kind: Any, value: Any) -> str:
    """A typed value from a config file or the Python API, as the text a user would have typed."""
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, (list, tuple)) and (typing.get_origin(kind) in (tuple, list) or kind is str):
        return ",".join(str(v) for v in value)  # lists, and list-like text options such as protect: [0, 1, 2, 29]
    raise OptionError(f"option {name}={value!r} must be a single value, not a {type(value).__name__}")


def _coerce(name: str, kind: Any, value: Any) -> Any:
    if not isinstance(value, str):
        value = _as_text(name, kind, value)
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Literal:
        if value not in args:
            raise OptionError(f"option {name}={value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value.lower() in ("none", "null", ""):
            return None
        return _coerce(name, next(a for a in args if a is not type(None)), value)
    if origin in (tuple, list):
        inner = args[0] if args else str
        items = tuple(_coerce(name, inner, v.strip()) for v in value.split(",") if v.strip())
        return items if origin is tuple else list(items)
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"option {name}={value!r} is not a boolean")
    try:
        return kind(value) if kind in (int, float, str) else value
    except ValueError as err:
        raise OptionError(f"option {name}={value!r} is not a valid {kind.__name__}") from err


def parse_options(options_cls: type, values: dict[str, Any], method: str = "method") -> Any:
    """Build the options dataclass, converting values by field type; unknown names are an error.

    Values are strings (``--option steps=16``) or plain scalars and lists (a config file, the Python
    API); anything else names the option and the type it needs.
    """
    if not isinstance(values, dict):
        raise OptionError(f"options for {method} must be a mapping of name: value, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise OptionError(f"unknown option {unknown[0]!r} for {method}; valid options: {valid}")
    hints = typing.get_type_hints(options_cls)
    try:
        return options_cls(**{name: _coerce(name, hints[name], value) for name, value in values.items()})
    except (TypeError, ValueError) as err:
        if isinstance(err, OptionError):
            raise
        raise OptionError(f"invalid options for {method}: {err}") from err


def options_to_dict(options: Any) -> dict[str, Any]:
    """JSON-ready view of an options dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()}


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """``["steps=16", "normalize=none"]`` -> ``{"steps": "16", "normalize": "none"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"option {pair!r} must look like name=value")
        out[key.strip()] = value.strip()
    return out
