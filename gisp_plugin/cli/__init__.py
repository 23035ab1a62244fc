"""The ``gisp`` command line: one subcommand per module in ``COMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gisp_plugin.cli.console import configure_logging

COMMANDS = (
    "gisp_plugin.cli.methods_cmd",
    "gisp_plugin.cli.prune_cmd",
    "gisp_plugin.cli.eval_cmd",
    "gisp_plugin.cli.compare_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gisp", description="Structured pruning of LLMs: pick methods by name, prune, evaluate, compare."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages, and show the logs and progress bars of lm-eval etc."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, getattr(args, "own_log_level", logging.INFO))
    try:
        return args.run(args) or 0
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except (ValueError, LookupError, OSError) as err:  # every user-facing error type of the package derives from these
        if args.verbose:
            raise
        print(f"gisp {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gisp {args.command}: interrupted; finished results are kept", file=sys.stderr)
        return 130
