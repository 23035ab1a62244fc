"""The ``gisp`` command line: one subcommand per module in ``COMMANDS``.

``python -m gisp_plugin`` is the same command, which is how ``torchrun --nproc-per-node N -m gisp_plugin
prune ...`` runs one job on N ranks (see ``gisp_plugin.distributed``). Under torchrun, ``prune`` and
``compare`` run on every rank (data parallel); the other commands run on rank 0 alone, the other ranks
exit at once, so nothing is evaluated, written or pushed twice.

Exit status, one per kind of outcome (also in ``gisp --help`` and docs/cli.md): 0 done; 2 refused or
stopped by something the user can fix, named in one line (a bad value or file, a folder another run is
writing, an offline Hub, a full disk); 1 an unforeseen failure (a bug: its type and place, ``-v`` for the
traceback); 130 interrupted (Ctrl-C or SIGTERM): finished work is kept and the same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from gisp_plugin.cli.console import configure_logging
from gisp_plugin.deploy.import_noise import quiet_torchao_import
from gisp_plugin.distributed.context import is_main_process, launch_rank, launched_by_torchrun
from gisp_plugin.distributed.failures import error_line, sigterm_raises

COMMANDS = (
    "gisp_plugin.cli.methods_cmd",
    "gisp_plugin.cli.prune_cmd",
    "gisp_plugin.cli.eval_cmd",
    "gisp_plugin.cli.compare_cmd",
    "gisp_plugin.cli.push_cmd",
    "gisp_plugin.cli.plan_cmd",
    "gisp_plugin.cli.export_cmd",
)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (what was wrong, where the usage is) instead of the whole usage."""

    def error(self, message: str) -> NoReturn:
        if launch_rank() != 0:  # under torchrun every rank parses the same command line: rank 0 says it once
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_CODES = (
    "exit status: 0 done; 2 refused or stopped by something you can fix, named in one line (a bad value or file, "
    "an --out folder another run is writing, an offline Hub, a full disk); 1 an unforeseen failure (run with -v "
    "for the traceback); 130 interrupted (Ctrl-C or SIGTERM): finished work is kept, the same command resumes"
)
# Conditions of the machine, not of the program: reported in one line with exit 2, never as a crash.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
RESUMABLE = ("prune", "compare")  # commands whose finished work a rerun of the same command reuses


class Terminated(KeyboardInterrupt):
    """SIGTERM outside torchrun: stops the command exactly like Ctrl-C (cleanup runs, finished work is kept)."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Outside torchrun, SIGTERM raises ``Terminated`` while the body runs (under torchrun it means another
    rank failed: ``sigterm_raises`` handles it)."""
    if launched_by_torchrun():
        yield
        return

    def stop(signum, frame) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _environment_error(err: BaseException) -> OSError | None:
    """The full disk, quota or permission error behind ``err`` (libraries wrap it in their own types)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gisp",
        description="Structured pruning of LLMs: pick methods by name, prune, evaluate, compare.",
        epilog=EXIT_CODES,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages, and show the logs and progress bars of lm-eval etc."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS:
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error is one line on stderr and exit status 2 (the traceback only with -v)."""
    quiet_torchao_import()  # before the commands import transformers, which imports torchao
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a malformed command line already explained by argparse
        return exit_.code if isinstance(exit_.code, int) else 2
    if launch_rank() != 0 and not getattr(args, "data_parallel", False):
        return 0  # under torchrun only prune and compare run on every rank; rank 0 runs the others alone
    configure_logging(args.verbose, getattr(args, "own_log_level", logging.INFO))
    quiet_torchao_import(not args.verbose)
    try:
        with sigterm_raises(), sigterm_interrupts():  # torchrun's stop (another rank failed), or the user's
            return args.run(args) or 0
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt as stop:
        if is_main_process():
            how = "SIGTERM" if isinstance(stop, Terminated) else "Ctrl-C"
            resume = "; run the same command again to resume" if args.command in RESUMABLE else ""
            print(f"gisp {args.command}: interrupted ({how}); finished results are kept{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if args.verbose:
            raise
        environment = _environment_error(err)
        expected = environment is not None or isinstance(err, (ValueError, LookupError, OSError))  # user-facing types
        if environment is not None:  # named as the machine's condition, whatever library wrapped it
            full = environment.errno in (errno.ENOSPC, errno.EDQUOT)
            fix = "free space or choose another place" if full else "choose a place you can write"
            message = f"{_one_line(environment)}; {fix} (finished results are kept)"
        else:
            message = _one_line(err) if expected else f"{_unforeseen(err)} (run with -v for the traceback)"
        line = error_line(args.command, message, err)  # under torchrun: one line on rank 0, not one per rank
        if line is not None:
            print(line, file=sys.stderr)
        return EXIT_BAD_INPUT if expected else EXIT_FAILED


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (some libraries' messages span several)."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and err.args:  # str(KeyError) is the quoted key alone
        text = f"missing {err.args[0]!r}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _unforeseen(err: BaseException) -> str:
    """Type, message and, for a bare one (``assert`` in a library), the failing line of code."""
    text = _one_line(err) if str(err).strip() else ""
    frames = traceback.extract_tb(err.__traceback__)
    if frames and not text:
        last = frames[-1]
        where = "/".join(Path(last.filename).parts[-3:])
        text = f"at {where}:{last.lineno}" + (f" ({last.line.strip()})" if last.line else "")
    return f"{type(err).__name__}: {text}"
