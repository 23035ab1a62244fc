"""Every data-parallel engine and method on tiny models, for ``test_data_parallel.py``.

``everything(work_dir)`` computes gradient sums, per-layer activation statistics and the subnetworks of
GISP, LLM-Pruner, Wanda-sp, FLAP, ShortGPT, SLEB, BlockPruner, SlimGPT and REAP (tiny mixture-of-experts
model). The test runs it in its own single
process, and launches ``torchrun --nproc-per-node 2 -m tests.distributed.dp_worker OUT``, where the two gloo
ranks run it data parallel and rank 0 saves what they got to ``OUT/results.pt``: the two must agree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.calibration.sequential import SequentialCalibration
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.context import current_setup, init_distributed
from gisp_plugin.importance.gradients import accumulate_gradients, weight_paths
from gisp_plugin.importance.losses import MARGIN, NTP
from gisp_plugin.pruning import run_method
from tests.tiny import random_ids, tiny_model

TARGETS = (0.2, 0.4)
# (name, method, options): every method, and the options that change how it calibrates.
METHODS = (
    ("gisp", "gisp", {"steps": 3, "protect": "none"}),
    ("gisp_margin", "gisp", {"steps": 2, "protect": "none", "loss": "margin", "batch_size": 3}),
    ("llm_pruner", "llm_pruner", {"taylor": "param_mix", "layer_start": 0, "layer_end": 3}),
    ("wanda_sp", "wanda_sp", {"batch_size": 3}),  # sequential: masks applied between layers on every rank
    ("wanda_sp_one_shot", "wanda_sp", {"sequential": False}),
    ("flap", "flap", {"batch_size": 3}),
    ("flap_ul_um", "flap", {"structure": "UL-UM", "propagate": "pruned"}),
    ("shortgpt", "shortgpt", {"batch_size": 3}),  # block influence: one forward pass, sums merged over ranks
    ("sleb", "sleb", {"batch_size": 3, "early_barrier": 0, "latter_barrier": 0}),  # perplexity sums merged per candidate
    ("blockpruner", "blockpruner", {"batch_size": 3}),
    ("slimgpt", "slimgpt", {"batch_size": 3}),  # input Gram matrices merged per layer; compensated weights
)


def calibration() -> CalibrationSet:
    """Seven sequences of different lengths (so batches are padded, and 2 ranks get 3 and 4 of them), each
    a multiple-choice option scored on its last tokens (so ``margin`` applies too)."""
    ids = random_ids(7, 16, seed=5)
    lengths = [16, 11, 14, 9, 16, 12, 15]
    polarity = [1, -1, -1, 1, -1, 1, -1]
    sequences, masks = [], []
    for row, length in enumerate(lengths):
        sequences.append(ids[row, :length])
        mask = torch.zeros(length, dtype=torch.bool)
        mask[length - 3 :] = True
        masks.append(mask)
    return CalibrationSet("dp-test", sequences, masks, polarity)


def _gradients(model, data: CalibrationSet) -> dict[str, Any]:
    paths = weight_paths(adapter_for(model).anatomy(model), include_dependents=True)
    out = {}
    for name, objective, squares in (("ntp", NTP, False), ("margin", MARGIN, True)):
        sums = accumulate_gradients(model, paths, data, objective, batch_size=2, per_sample_squares=squares)
        out[name] = {"grad": sums.grad, "grad_sq": sums.grad_sq, "n_samples": sums.n_samples, "loss": sums.loss}
        out[name]["n_tokens"] = sums.n_tokens
    return out


def _statistics(model, data: CalibrationSet) -> dict[int, dict[str, dict[str, Any]]]:
    layers = adapter_for(model).decoder_layers(model)
    walk = SequentialCalibration(model, layers, data, ("self_attn.o_proj", "mlp.down_proj"), batch_size=3, progress=False)
    return {
        layer.index: {
            path: {"n_tokens": s.n_tokens, "mean": s.mean, "variance": s.variance, "squared_norm": s.squared_norm}
            for path, s in layer.stats.items()
        }
        for layer in walk
    }


def _subnetworks(model, method: str, options: dict, data: CalibrationSet, work_dir: Path | None = None) -> list[dict]:
    return [
        {"keep": s.keep.to_json(), "biases": s.extra_biases, "weights": s.updated_weights, "sparsity": s.sparsity}
        for s in run_method(model, None, method, TARGETS, options, data, work_dir=work_dir)
    ]


def everything(work_dir: Path) -> dict[str, Any]:
    """What the test compares between one process and two ranks (``work_dir``: GISP's resume state)."""
    data = calibration()
    model = tiny_model("qwen2")  # grouped-query attention, q/k/v biases
    results: dict[str, Any] = {"gradients": _gradients(model, data), "statistics": _statistics(model, data)}
    for name, method, options in METHODS:
        results[name] = _subnetworks(model, method, options, data)
    # resuming: a finished run's state is read (by rank 0) and replayed, with no gradient computed again
    results["gisp_resumed"] = [_subnetworks(model, "gisp", METHODS[0][2], data, work_dir) for _ in range(2)]
    moe = tiny_model("qwen2_moe")
    results["reap"] = _subnetworks(moe, "reap", {"batch_size": 3}, data)
    results["flap_moe"] = _subnetworks(moe, "flap", {}, data)
    return results


def main(out: Path) -> None:
    setup = init_distributed("cpu")
    work_dir = out / f"work-rank{setup.rank}"  # each rank its own folder: a rank other than 0 must write nothing
    results = everything(work_dir)
    results["setup"] = current_setup().record()
    if setup.is_main:
        torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
