"""``gisp plan``: the memory a GISP scoring pass needs per rank, and which GPUs hold it, from the config alone.

    gisp plan --model benchmarks/configs/llama-3-70b.json --method gisp --nproc 8 --fsdp
    gisp plan --model smollm2-135m --method gisp --dtype float32 --seqlen 256 --batch-size 2

``--model`` takes a ``config.json``, a model folder, the built-in ``smollm2-135m`` or a hub id (only its
config is read; no weights). The model is built on the meta device, so the counts are the real modules';
``gisp_plugin.distributed.memory_model`` explains every term. ``--json`` prints the plan as JSON.
"""

from __future__ import annotations

import argparse
import json

from gisp_plugin.cli.arguments import int_at_least
from gisp_plugin.distributed.memory_model import GIB, GPU_SIZES_GB, USABLE, MemoryPlan, check_plan_inputs, plan_memory
from gisp_plugin.inputs import InputError
from gisp_plugin.models.loading import parse_dtype
from gisp_plugin.plugins.manager import lookup

PLANNED_METHODS = ("gisp",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan",
        help="memory per rank of GISP scoring, and which GPUs suffice, from the model's config alone",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a config.json, a model folder, smollm2-135m, or a hub id")
    parser.add_argument("--method", default="gisp", help="the pruning method (gradient scoring: gisp)")
    parser.add_argument("--nproc", type=int_at_least(1), default=1, help="ranks (processes, one per GPU); default 1")
    parser.add_argument("--fsdp", action="store_true", help="shard weights and gradient sums across the ranks (FSDP2)")
    parser.add_argument("--cpu-offload", action="store_true", help="with --fsdp: keep the shards in CPU memory")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype: bfloat16 (default), float16, float32")
    parser.add_argument("--seqlen", type=int_at_least(1), default=256, help="tokens per calibration sequence (default 256)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=2, help="sequences per micro-batch (default 2)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_plan_inputs(args.nproc, args.fsdp, args.batch_size, args.seqlen, args.cpu_offload)
    parse_dtype(args.dtype)
    lookup("method", args.method)  # an unknown name fails here, listing the methods
    if args.method not in PLANNED_METHODS:
        raise InputError(f"gisp plan models gradient scoring ({', '.join(PLANNED_METHODS)}), not {args.method!r}")
    plan = plan_memory(args.model, args.nproc, args.fsdp, args.dtype, args.batch_size, args.seqlen, args.cpu_offload)
    print(json.dumps(plan.to_json(), indent=1) if args.json else render(plan))
    return 0


def _gib(n: int) -> str:
    return f"{n / GIB:10.2f}"


def render(plan: MemoryPlan) -> str:
    """The plan as a table of GiB per rank, and the GPU sizes that hold it."""
    c = plan.counts
    mode = f"FSDP over {plan.nproc} ranks" if plan.fsdp else f"{plan.nproc} rank(s), each with the whole model"
    if plan.cpu_offload:
        mode += ", shards offloaded to CPU"
    rows = [
        ("weights" + (" (this rank's shard)" if plan.fsdp else ""), plan.weights),
        ("gathered for compute (root + 2 layers)" if plan.fsdp else "gathered for compute", plan.gathered),
        ("masked weight copies", plan.masked_copies),
        ("float32 gradient sums" + (" (shard)" if plan.fsdp else ""), plan.gradient_sums),
        ("gradient in flight", plan.gradient_in_flight),
        ("masks", plan.masks),
        (f"activations, micro-batch {plan.batch_size} x {plan.seqlen}", plan.activations),
    ]
    lines = [
        f"gisp plan: {plan.model}, {plan.dtype}, {mode}",
        f"parameters {c.params / 1e9:.3f} B ({c.layers} layers); float32 sums kept for {c.summed / 1e9:.3f} B prunable weights",
        "",
        f"{'per rank':<48}{'GiB':>10}",
    ]
    lines += [f"{name:<48}{_gib(value)}" for name, value in rows]
    where = "GPU" if plan.cpu_offload else "total"
    lines.append(f"{where:<48}{_gib(plan.device_total)}")
    lines.append(f"{where + ' with gradient checkpointing':<48}{_gib(plan.device_total_checkpointed)}")
    if plan.cpu_offload:
        lines.append(f"{'CPU memory (offloaded shards)':<48}{_gib(plan.host_total)}")
    lines.append("")
    for label, sizes in (("fits on", plan.fits()), ("with gradient checkpointing", plan.fits(True))):
        fit = ", ".join(f"{s} GB" for s in sizes) or "none of " + "/".join(str(s) for s in GPU_SIZES_GB) + " GB"
        lines.append(f"{label}: {fit}")
    lines.append(f"(a GPU fits when the total is at most {USABLE:.0%} of its memory; see gisp_plugin.distributed.memory_model)")
    return "\n".join(lines)
