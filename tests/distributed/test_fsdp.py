"""FSDP2 on 2 CPU ranks (gloo), spawned with torchrun: sharded loading, GISP scoring and gathered compaction
reproduce a one-process run on a tiny grouped-query-attention model (Mistral layout, 8 query / 2 kv heads);
a second launch keeps the shards in CPU memory (``CPUOffloadPolicy``) and scores with gradient checkpointing.

Tolerances: float32 throughout; logits agree to 1e-5 absolute (only summation order differs), raw unit
scores to 1e-5 relative to each kind's largest score, and the pruned structures exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.distributed.context import DistributedSetup
from gisp_plugin.distributed.sharded_loading import load_sharded_model
from gisp_plugin.inputs import InputError
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods.gisp import GispOptions, step_scores
from gisp_plugin.models.loading import load_model
from gisp_plugin.pruning import run_method
from tests.distributed.fsdp_cases import GISP_OPTIONS, TARGETS, calibration, probe_ids
from tests.distributed.launch import torchrun
from tests.tiny import tiny_folder, tiny_tokenizer

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    model_dir, _ = tiny_folder(tmp_path_factory.mktemp("fsdp"), "mistral", tiny_tokenizer())
    return model_dir


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory) -> Path:
    """Qwen2: tied embeddings (one parameter for the embeddings and the LM head) and q/k/v biases."""
    model_dir, _ = tiny_folder(tmp_path_factory.mktemp("fsdp-tied"), "qwen2", tiny_tokenizer())
    return model_dir


@pytest.fixture(scope="module", params=[False, True], ids=["fsdp", "fsdp+cpu_offload+checkpointing"])
def sharded(request, folder, tied_folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out")
    job = torchrun(WORKER, str(folder), str(tied_folder), str(out), *(["--cpu-offload"] if request.param else []), timeout=300)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    return {"tensors": load_file(out / "tensors.safetensors"), **json.loads((out / "record.json").read_text())}


@pytest.fixture(scope="module")
def one_process(folder) -> dict:
    """The same run in this process, without FSDP."""
    model, tokenizer = load_model(str(folder))
    subnetworks = list(run_method(model, tokenizer, "gisp", TARGETS, GISP_OPTIONS, calibration=calibration()))
    return {"model": model, "subnetworks": subnetworks, "anatomy": adapter_for(model).anatomy(model)}


def test_sharded_loading_gives_the_logits_of_normal_loading(sharded, one_process):
    with torch.no_grad():
        expected = one_process["model"](probe_ids()).logits
    torch.testing.assert_close(sharded["tensors"]["loaded_logits"], expected, rtol=0, atol=1e-5)


def test_sharded_loading_keeps_tied_embeddings_and_biases(sharded, tied_folder):
    model, _ = load_model(str(tied_folder))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        expected = model(probe_ids()).logits
    torch.testing.assert_close(sharded["tensors"]["tied_logits"], expected, rtol=0, atol=1e-5)


def test_fsdp_gisp_prunes_exactly_the_structures_of_one_process(sharded, one_process):
    expected = [s.keep.to_json() for s in one_process["subnetworks"]]
    assert sharded["keeps"] == json.loads(json.dumps(expected))
    assert sharded["sparsities"] == pytest.approx([s.sparsity for s in one_process["subnetworks"]], abs=1e-12)
    assert any(units for layer in expected[-1].values() for units in layer.values())  # something was pruned


def test_fsdp_scores_and_loss_match_one_process(sharded, one_process):
    model, anatomy = one_process["model"], one_process["anatomy"]
    with MaskedModel(model, anatomy) as masked:
        masked.apply(one_process["subnetworks"][0].keep)
        raw, sums = step_scores(model, anatomy, calibration(), GispOptions(**GISP_OPTIONS))
    for (layer, kind), expected in raw.items():
        got = sharded["tensors"][f"scores/{layer}/{kind}"]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
        assert bool((got[~one_process["subnetworks"][0].keep[layer, kind]] == 0).all())  # masked units score 0
    assert sharded["loss"] == pytest.approx(sums.loss, rel=1e-6)
    assert sharded["n_tokens"] == sums.n_tokens


def test_compaction_gathered_on_rank_0_equals_the_masked_dense_model(sharded, one_process):
    model, anatomy = one_process["model"], one_process["anatomy"]
    keep = KeepMask.from_json(anatomy, sharded["keeps"][-1])
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        expected = model(probe_ids()).logits
    torch.testing.assert_close(sharded["tensors"]["compact_logits"], expected, rtol=0, atol=1e-5)
    compact = adapter_for(model).compact(model, keep)
    assert sharded["compact_params"] == sum(p.numel() for p in compact.parameters())


def test_sharded_loading_outside_torchrun_is_refused(folder):
    with pytest.raises(InputError, match="torchrun"):
        load_sharded_model(str(folder), "cpu", "float32", DistributedSetup())
