"""One rank of the FSDP tests: ``torchrun --nproc-per-node 2 tests/distributed/fsdp_worker.py FOLDER TIED OUT [--cpu-offload]``.

Through the public Python API only: load the tiny model in ``FOLDER`` sharded, compare nothing itself,
and write what a one-process run must reproduce to ``OUT`` (rank 0; safetensors and JSON):
the sharded model's logits, GISP's subnetworks on the sharded model, the raw unit scores of one
masked step, and the logits of the compacted model gathered layer by layer onto rank 0; also the logits
of the model in ``TIED`` (tied embeddings, biases) loaded sharded. ``--cpu-offload`` keeps the shards in
CPU memory and scores with gradient checkpointing (neither may change a result).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.distributed.context import init_distributed
from gisp_plugin.distributed.sharded_compaction import compact_sharded
from gisp_plugin.distributed.sharded_loading import load_sharded_model
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods.gisp import GispOptions, step_scores
from gisp_plugin.pruning import run_method
from tests.distributed.fsdp_cases import GISP_OPTIONS, TARGETS, calibration, probe_ids


def main(folder: str, tied_folder: str, out: str, cpu_offload: bool) -> None:
    setup = init_distributed("cpu", fsdp=True)
    out_dir = Path(out)
    model, tokenizer = load_sharded_model(folder, "cpu", "float32", setup, cpu_offload=cpu_offload)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        tensors["loaded_logits"] = model(probe_ids()).logits.float().contiguous()
    options = {**GISP_OPTIONS, "gradient_checkpointing": cpu_offload}
    subnetworks = list(run_method(model, tokenizer, "gisp", TARGETS, options, calibration=calibration()))
    anatomy = adapter_for(model).anatomy(model)
    with MaskedModel(model, anatomy) as masked:  # one scoring pass on a masked model: the raw unit scores
        masked.apply(subnetworks[0].keep)
        raw, sums = step_scores(model, anatomy, calibration(), GispOptions(**options))
    tensors.update({f"scores/{layer}/{kind}": values for (layer, kind), values in raw.items()})
    compact = compact_sharded(model, subnetworks[-1].keep)
    tied, _ = load_sharded_model(tied_folder, "cpu", "float32", setup, cpu_offload=cpu_offload)
    with torch.no_grad():
        tensors["tied_logits"] = tied(probe_ids()).logits.float().contiguous()
    if setup.is_main:
        with torch.no_grad():
            tensors["compact_logits"] = compact(probe_ids()).logits.float().contiguous()
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out_dir / "tensors.safetensors")
        record = {
            "keeps": [s.keep.to_json() for s in subnetworks],
            "sparsities": [s.sparsity for s in subnetworks],
            "loss": sums.loss,
            "n_tokens": sums.n_tokens,
            "compact_params": sum(p.numel() for p in compact.parameters()),
        }
        (out_dir / "record.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--cpu-offload" in sys.argv[4:])
