"""The ``gisp`` command line: one subcommand per module in ``COMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gisp_plugin.deploy.import_noise import quiet_torchao_import

COMMANDS = (
    "gisp_plugin.cli.methods_cmd",
    "gisp_plugin.cli.prune_cmd",
    "gisp_plugin.cli.eval_cmd",
    "gisp_plugin.cli.compare_cmd",
    "gisp_plugin.cli.push_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gisp", description="Structured pruning of LLMs: pick methods by name, prune, evaluate, compare."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_torchao_import()  # before the commands import transformers, which imports torchao
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    quiet_torchao_import(not args.verbose)
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
