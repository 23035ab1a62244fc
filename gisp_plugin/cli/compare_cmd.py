"""``gisp compare``: methods x sparsities x evaluations, one table. With no arguments: the built-in default."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from gisp_plugin.checkpoint.locking import hold_folder
from gisp_plugin.cli.arguments import add_shape_argument, int_at_least
from gisp_plugin.cli.console import quiet_libraries
from gisp_plugin.distributed.context import is_main_process
from gisp_plugin.harness.config import DEFAULT_METHODS, ComparisonConfig, ConfigError
from gisp_plugin.harness.progress import ComparisonProgress
from gisp_plugin.harness.report import markdown, write_outputs
from gisp_plugin.harness.runner import run_comparison
from gisp_plugin.methods.options import parse_assignments

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "compare",
        help="compare methods head to head (no arguments: SmolLM2-135M, the default methods, offline data)",
        description="Every flag overrides the same key of --config; keys not given keep the built-in defaults.",
    )
    parser.add_argument("--config", type=Path, help="YAML, TOML or JSON file holding the whole comparison")
    parser.add_argument("--model", help="hub id, local folder or smollm2-135m")
    parser.add_argument(
        "--methods", help=f"comma list, or 'all' for every registered method (default: {','.join(DEFAULT_METHODS)})"
    )
    parser.add_argument("--sparsity", dest="sparsities", help="comma list of targets, e.g. 0.2,0.3,0.5")
    parser.add_argument(
        "--eval", dest="evals", action="append", help="evaluation spec (repeatable), e.g. lm_eval:tasks=boolq+piqa"
    )
    parser.add_argument("--calibration", help="calibration data source shared by all methods")
    parser.add_argument("--n-samples", type=int_at_least(1))
    parser.add_argument("--seqlen", type=int_at_least(2))
    parser.add_argument("--option", "-o", action="append", default=[], help="METHOD.name=value, e.g. gisp.steps=16")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--seed", type=int_at_least(0))
    parser.add_argument(
        "--pad-to",
        type=int_at_least(1),
        help="round MLP widths of compacted models up to a multiple (default: 64 on CUDA, 1 elsewhere)",
    )
    parser.add_argument(
        "--quantize",
        "-q",
        action="append",
        help="also evaluate METHOD quantised with torchao, as its own rows (repeatable): gisp:int8wo, dense:int8dq",
    )
    add_shape_argument(parser, default=None)
    parser.add_argument("--save-models", action="store_true", default=None, help="also save every compacted model")
    parser.add_argument(
        "--export",
        default=None,
        metavar="FORMAT",
        help="with --save-models: also export every saved model (gguf, nemotron-nas, hf; comma-separated)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/compare"), help="results folder (reused on rerun)")
    parser.add_argument(  # also after the subcommand; SUPPRESS keeps `gisp -v compare` working
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show every log line and progress bar"
    )
    parser.set_defaults(run=run, own_log_level=logging.WARNING, data_parallel=True)  # the progress display says what runs


def build_config(args: argparse.Namespace) -> ComparisonConfig:
    if args.methods is not None and not args.methods.replace(",", "").strip():
        raise ConfigError("--methods names no method; leave it out for the default methods, or give 'all'")
    config = ComparisonConfig.from_file(args.config) if args.config else ComparisonConfig()
    overrides = {
        key: getattr(args, key)
        for key in (
            "model",
            "methods",
            "sparsities",
            "evals",
            "calibration",
            "n_samples",
            "seqlen",
            "device",
            "dtype",
            "seed",
            "pad_to",
            "quantize",
            "export",
            "shape",
        )
        if getattr(args, key) is not None
    }
    if args.save_models is not None:
        overrides["save_models"] = True
    config = ComparisonConfig.from_mapping({**config.to_json(), **overrides}, "command line")
    for key, value in parse_assignments(args.option).items():
        method, dot, name = key.partition(".")
        if not dot:
            raise ConfigError(f"option {key!r} must name its method: METHOD.name=value")
        config.method_options.setdefault(method, {})[name] = value
    return config


def run(args: argparse.Namespace) -> int:
    """One progress bar and one line per finished row on stderr (everything with -v), the table on stdout.

    Under torchrun (``torchrun --nproc-per-node N -m gisp_plugin compare ...``) the ranks prune together and
    rank 0 alone evaluates, writes and prints (see ``gisp_plugin.harness.runner``).
    """
    config = build_config(args)
    started = time.perf_counter()
    progress = ComparisonProgress(bar=is_main_process(), file=sys.stderr)
    lock = hold_folder(args.out, fix="wait for it to finish, or give another --out") if is_main_process() else nullcontext()
    with lock, quiet_libraries(enabled=not getattr(args, "verbose", False)):  # the results are written under the lock too
        result = run_comparison(config, args.out, progress)
        if result is None:  # a rank other than 0 under torchrun: its share of the pruning is done
            return 0
        paths = write_outputs(result, args.out)
    print(markdown(result))
    print(f"results in {args.out} ({', '.join(p.name for p in paths.values())}); {time.perf_counter() - started:.0f} s")
    return 0
