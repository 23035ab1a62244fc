"""argparse value types shared by the commands: each refuses a bad value with the value named."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from gisp_plugin.importance.shapes import ShapeError, check_shape


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for whole numbers >= ``minimum`` (so 0 is never mistaken for "not given")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum of {minimum}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def parse_sparsities(text: str) -> list[float]:
    """``"0.2,0.3,0.5"`` -> ``[0.2, 0.3, 0.5]`` (the range is checked with the method's reach)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"sparsity list {text!r} must be numbers like 0.2,0.3,0.5") from err
    if not values:
        raise argparse.ArgumentTypeError(f"sparsity list {text!r} names no target; give numbers like 0.2,0.3,0.5")
    return values


def parse_shape(text: str) -> str:
    """A ``--shape`` name (``gisp_plugin.importance.shapes.SHAPES``), refused with the valid names listed."""
    try:
        return check_shape(text)
    except ShapeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_shape_argument(parser: argparse.ArgumentParser, default: str | None = "free") -> None:
    """``--shape`` (``gisp prune``, ``gisp compare``; ``None``: not given, the config file decides)."""
    parser.add_argument(
        "--shape",
        type=parse_shape,
        default=default,
        help="shape the engine you deploy on runs: free (default), even-groups (GGUF deci, no padding), "
        "kv-groups (whole key/value groups), uniform (every layer alike: the family's own config); docs/shapes.md",
    )
