"""What the FSDP worker and the one-process reference both run: the same data, targets and options."""

from __future__ import annotations

from gisp_plugin.data.api import CalibrationSet
from tests.tiny import random_ids

TARGETS = [0.2, 0.4]
# 5 samples in batches of 2 over 2 ranks: rank 0 runs one batch, rank 1 two (the padding round is tested)
GISP_OPTIONS = {"steps": 3, "protect": "none", "batch_size": 2}


def calibration(n: int = 5) -> CalibrationSet:
    ids = random_ids(n, 16, seed=1)
    return CalibrationSet("random", [ids[i, : 10 + i] for i in range(n)])


def probe_ids():
    return random_ids(2, 12, seed=7)


# What ``fsdp_variants_worker`` runs sharded and ``test_fsdp_variants`` in one process: case name ->
# (tiny family of tests.tiny, dtype, method, options). Dense families are loaded sharded from their saved
# folder (``load_sharded_model``); mixtures of experts are built in memory and sharded (``shard_model``):
# transformers saves their experts one tensor per expert, which sharded loading does not read.
VARIANTS = {
    "llm_pruner": ("mistral", "float32", "llm_pruner", {"layer_start": 0, "layer_end": 3, "batch_size": 2}),
    "llm_pruner_vectorize": ("mistral", "float32", "llm_pruner", {"taylor": "vectorize", "layer_start": 0, "layer_end": 3}),
    "gisp_bfloat16": ("mistral", "bfloat16", "gisp", GISP_OPTIONS),
    "gisp_qwen2_moe": ("qwen2_moe", "float32", "gisp", GISP_OPTIONS),
    "gisp_mixtral": ("mixtral", "float32", "gisp", GISP_OPTIONS),
}
