"""``gisp methods``: every registered method with its plugin, version and description."""

from __future__ import annotations

import argparse

from gisp_plugin.plugins.manager import registered


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("methods", help="list pruning methods (and, with --all, every plugin item)")
    parser.add_argument("--all", action="store_true", help="also list adapters, data sources, losses, evaluators")
    parser.set_defaults(run=run)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)


def run(args: argparse.Namespace) -> int:
    kinds = ["method", "adapter", "data source", "loss", "evaluator"] if args.all else ["method"]
    for kind in kinds:
        items = registered(kind)
        rows = [(kind.upper(), "PLUGIN", "VERSION", "DESCRIPTION")]
        rows += [(name, entry.plugin, entry.version, entry.item.description) for name, entry in items.items()]
        print(_table(rows))
        if kind != kinds[-1]:
            print()
    return 0
