"""``gisp prune``: one method, several targets, one compacted model per target (and the trajectory).

The flags become one ``PruneRequest`` here, at the command line's edge, which checks them all before any
model is loaded; ``gisp_plugin.prune_job.prune`` runs it (also under ``torchrun``: see there). The Python
API builds the same request, so both get the same checks and the same one-line errors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gisp_plugin.cli.arguments import add_shape_argument, int_at_least, parse_sparsities
from gisp_plugin.cli.export_cmd import add_export_options, export_options
from gisp_plugin.deploy.quantize import CHOICES
from gisp_plugin.methods.options import parse_assignments
from gisp_plugin.models.loading import DEFAULT_MODEL
from gisp_plugin.prune_job import prune
from gisp_plugin.prune_request import PruneRequest


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, device and dtype options shared by every command that loads a model."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local folder or {DEFAULT_MODEL!r} (default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--attn", default=None, help="attention implementation: eager, sdpa, ...")
    parser.add_argument("--seed", type=int_at_least(0), default=0)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration", default=None, help="calibration data source (default: the method's own)")
    parser.add_argument("--n-samples", type=int_at_least(1), default=None, help="calibration sequences")
    parser.add_argument("--seqlen", type=int_at_least(2), default=None, help="tokens per calibration sequence")


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        "-q",
        default=None,
        metavar="QUANT",
        help=f"quantise with torchao after pruning: {', '.join(CHOICES)} (int4wo:group_size=N); CPU runs int8wo, int8dq",
    )


def add_export_argument(parser: argparse.ArgumentParser) -> None:
    """``--export FORMAT[,FORMAT]`` and the export options, for every command that saves pruned folders."""
    parser.add_argument(
        "--export",
        default=None,
        metavar="FORMAT",
        help="also export every saved model: gguf (llama.cpp), nemotron-nas (vLLM, SGLang, TensorRT-LLM), hf; comma-separated",
    )
    add_export_options(parser)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("prune", help="prune a model to one or more sparsities and save compacted models")
    add_model_arguments(parser)
    parser.add_argument("--method", required=True, help="method name (see `gisp methods`)")
    parser.add_argument("--sparsity", required=True, type=parse_sparsities, help="targets, e.g. 0.2,0.3,0.5")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--option", "-o", action="append", default=[], help="method option name=value (repeatable)")
    add_shape_argument(parser)
    add_calibration_arguments(parser)
    parser.add_argument(
        "--pad-to",
        type=int_at_least(1),
        default=None,
        help="round MLP widths up to a multiple with inert zero channels (default: 64 on CUDA, 1 = none elsewhere)",
    )
    add_quantize_argument(parser)
    add_export_argument(parser)
    parser.add_argument("--trajectory-only", action="store_true", help="write only the trajectory (nested methods)")
    parser.add_argument(
        "--recover-steps",
        type=int_at_least(0),
        default=0,
        help="LoRA recovery fine-tuning steps on each compacted model (default 0: off)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an --out folder that holds another run (swapped in when complete)"
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model across the ranks with FSDP2 (methods that score by gradients: gisp, llm_pruner)",
    )
    parser.add_argument(
        "--cpu-offload", action="store_true", help="with --fsdp: keep the shards in CPU memory between uses (CPUOffloadPolicy)"
    )
    parser.set_defaults(run=run, data_parallel=True)


def request_from_args(args: argparse.Namespace) -> PruneRequest:
    """The flags as one checked ``PruneRequest`` (every check that needs no model runs here, before loading)."""
    return PruneRequest(
        model=args.model,
        method=args.method,
        targets=args.sparsity,
        out=args.out,
        options=parse_assignments(args.option),
        shape=args.shape,
        device=args.device,
        dtype=args.dtype,
        attn=args.attn,
        seed=args.seed,
        calibration=args.calibration,
        n_samples=args.n_samples,
        seqlen=args.seqlen,
        pad_to=args.pad_to,
        quantize=args.quantize,
        export=args.export,
        export_options=export_options(args),
        trajectory_only=args.trajectory_only,
        recover_steps=args.recover_steps,
        overwrite=args.overwrite,
        fsdp=args.fsdp,
        cpu_offload=args.cpu_offload,
    )


def run(args: argparse.Namespace) -> int:
    """Check the flags, run the request, print one JSON line per target (rank 0 alone under torchrun)."""
    for line in prune(request_from_args(args)):
        print(json.dumps(line))
    return 0
