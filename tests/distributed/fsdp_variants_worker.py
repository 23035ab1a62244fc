"""One rank of ``test_fsdp_variants.py``: ``torchrun --nproc-per-node 2 -m tests.distributed.fsdp_variants_worker ROOT OUT``.

For every case of ``fsdp_cases.VARIANTS`` (a tiny family, a dtype, a method and its options): get the model
sharded (a dense family loaded shard by shard from ``ROOT/tiny-FAMILY``; a mixture of experts built from its
seed on every rank and sharded in place), run the method through the public API, and have rank 0 save to
``OUT/CASE.pt`` what a one-process run must reproduce: the subnetworks' pruned structures and sparsities,
the raw unit scores of one GISP step on the dense model (GISP cases), and the logits of the last
subnetwork compacted from the sharded model and gathered onto rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.distributed.context import init_distributed
from gisp_plugin.distributed.fsdp import shard_model
from gisp_plugin.distributed.sharded_compaction import compact_sharded
from gisp_plugin.distributed.sharded_loading import load_sharded_model
from gisp_plugin.methods.gisp import GispOptions, step_scores
from gisp_plugin.models.loading import parse_dtype
from gisp_plugin.pruning import run_method
from tests.distributed.fsdp_cases import TARGETS, VARIANTS, calibration, probe_ids
from tests.tiny import MOE_FAMILIES, tiny_model


def sharded_model(root: Path, family: str, dtype: str, setup):
    if family in MOE_FAMILIES:
        return shard_model(tiny_model(family).to(parse_dtype(dtype))), None
    return load_sharded_model(str(root / f"tiny-{family}"), "cpu", dtype, setup)  # as tests.tiny.tiny_folder saves it


def main(root: Path, out: Path) -> None:
    setup = init_distributed("cpu", fsdp=True)
    for case, (family, dtype, method, options) in VARIANTS.items():
        model, tokenizer = sharded_model(root, family, dtype, setup)
        result = {}
        if method == "gisp":
            result["scores"], _ = step_scores(model, adapter_for(model).anatomy(model), calibration(), GispOptions(**options))
        subnetworks = list(run_method(model, tokenizer, method, TARGETS, options, calibration=calibration()))
        result["keeps"] = [s.keep.to_json() for s in subnetworks]
        result["sparsities"] = [s.sparsity for s in subnetworks]
        compact = compact_sharded(model, subnetworks[-1].keep)
        if setup.is_main:
            with torch.no_grad():
                result["compact_logits"] = compact(probe_ids()).logits.float()
            torch.save(result, out / f"{case}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
