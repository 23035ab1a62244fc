"""Minitron data parallel: ``torchrun --nproc-per-node 2`` (gloo, CPU) against one process.

Two real 2-rank jobs are spawned: ``gisp prune --method minitron`` (width: heads, MLP channels and hidden
channels), whose ``pruning.json`` must name the same structures as the same command in one process and whose
compacted model must equal the dense model under those masks; and this module run as a worker
(``python -m tests.distributed.test_torchrun_minitron OUT``), where the ranks compute Minitron's importance
on seven sequences of different lengths (ranks get 4 and 3 of them, in padded batches) and rank 0 saves
it: every score (heads, channels, hidden channels, layers) must equal the one-process scores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import HIDDEN_CHANNEL, MODEL_LEVEL, KeepMask
from gisp_plugin.cli import main
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods.api import PruningJob
from gisp_plugin.methods.options import parse_options
from tests.distributed.launch import torchrun
from tests.tiny import random_ids, tiny_folder, tiny_model

WIDTH = ("prune=num_attention_heads+ffn_hidden_size+hidden_size", "channel_divisor=2", "batch_size=2")
ALL_AXES = {"prune": "num_attention_heads+ffn_hidden_size+hidden_size+num_layers", "channel_divisor": "8", "batch_size": "2"}


def calibration() -> CalibrationSet:
    """Seven sequences of different lengths: padded batches, and 2 ranks get 4 and 3 of them."""
    ids = random_ids(7, 16, seed=5)
    return CalibrationSet("ragged", [ids[i, :length] for i, length in enumerate([16, 11, 14, 9, 16, 12, 15])])


def scores() -> dict[str, torch.Tensor]:
    """Minitron's importance on a tiny grouped-query model, every axis (this rank's share under torchrun)."""
    from gisp_baselines.minitron import MinitronOptions, importance

    model = tiny_model("mistral")
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    options = parse_options(MinitronOptions, ALL_AXES, "minitron")
    job = PruningJob(model, None, adapter, anatomy, MaskedModel(model, anatomy), (0.3,), options, calibration())
    try:
        got = importance(job, options)
    finally:
        job.masked.release()
    out = {f"heads{i}": v for i, v in got.heads.items()} | {f"channels{i}": v for i, v in got.channels.items()}
    return out | {"hidden": got.hidden, "layers": got.layers}


def test_importance_on_two_ranks_equals_one_process(tmp_path):
    job = torchrun("-m", "tests.distributed.test_torchrun_minitron", tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    ranks = torch.load(tmp_path / "scores.pt")
    one = scores()
    assert sorted(ranks) == sorted(one)
    for name, value in one.items():  # float64 sums of float32 activations, batched differently: 1e-6 relative
        torch.testing.assert_close(ranks[name], value, rtol=1e-6, atol=1e-9, msg=name)


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tokenizer):
    """A tiny grouped-query model (tied embeddings) saved with its tokenizer, and a text file to calibrate on."""
    return tiny_folder(tmp_path_factory.mktemp("dense"), "qwen2", tokenizer)


def _prune_args(model_dir: Path, text: Path, out: Path) -> list[str]:
    args = ["prune", "--model", model_dir, "--method", "minitron", "--sparsity", "0.2,0.4", "--out", out, "--device", "cpu"]
    args += ["--calibration", f"file:{text}", "--n-samples", "7", "--seqlen", "16"]
    return [str(a) for a in args] + [part for option in WIDTH for part in ("-o", option)]


def test_prune_on_two_ranks_writes_what_one_process_writes(dense, tmp_path):
    model_dir, text = dense
    job = torchrun("-m", "gisp_plugin", *_prune_args(model_dir, text, tmp_path / "ranks"))
    assert job.returncode == 0, job.stderr[-3000:]
    assert main(_prune_args(model_dir, text, tmp_path / "one")) == 0
    records = {p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/*/pruning.json")}
    assert sorted(records) == ["one/minitron-s0.20", "one/minitron-s0.40", "ranks/minitron-s0.20", "ranks/minitron-s0.40"]
    dense_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    anatomy = adapter_for(dense_model).anatomy(dense_model)
    ids = random_ids()
    for target in ("0.20", "0.40"):
        ranks, one = records[f"ranks/minitron-s{target}"], records[f"one/minitron-s{target}"]
        assert ranks["pruned_structures"] == one["pruned_structures"]
        assert ranks["distributed"]["world_size"] == 2 and one["distributed"]["world_size"] == 1
        keep = KeepMask.from_json(anatomy, ranks["pruned_structures"])
        assert not bool(keep[MODEL_LEVEL, HIDDEN_CHANNEL].all())  # hidden channels removed, on both
        compact = AutoModelForCausalLM.from_pretrained(tmp_path / "ranks" / f"minitron-s{target}", trust_remote_code=True)
        with MaskedModel(dense_model, anatomy) as masked, torch.no_grad():
            masked.apply(keep)
            torch.testing.assert_close(compact.eval()(ids).logits, dense_model(ids).logits, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":  # a torchrun worker: every rank computes its share, rank 0 saves the merged scores
    from gisp_plugin.distributed.context import init_distributed

    setup = init_distributed("cpu")
    result = scores()
    if setup.rank == 0:
        torch.save(result, Path(sys.argv[1]) / "scores.pt")
