"""FSDP2 beyond GISP on a float32 dense model, on 2 CPU ranks (gloo) spawned with torchrun: LLM-Pruner (declared
shardable; its default and ``vectorize`` Taylor scores), GISP in bfloat16, and GISP on two mixtures of
experts (Qwen2-MoE with its shared expert, Mixtral). Each case must prune exactly the structures one process
prunes, and its compacted model, gathered onto rank 0, must compute what the dense model computes under
the same masks.

Tolerances. float32 (LLM-Pruner, MoE): raw unit scores agree to 1e-5 of each kind's largest (measured
1.2e-7: only the order of additions differs) and logits to 1e-5 absolute (measured 1.5e-7).

bfloat16: FSDP2 reduce-scatters gradients in the parameters' dtype, so the two ranks' gradients of one
round are added and rounded once in bfloat16, where one process folds each into a float32 sum. Unit
scores therefore agree only to one bfloat16 rounding, 2**-8 of the largest (measured 3.4e-4). That is
larger than some gaps between units: on another model two units within it of each other at a cut could be
chosen differently. On this model none is, and every step is deterministic, so the test asserts the same
structures (it fails if sharding changed a choice here) and states the score tolerance that holds in
general. The compacted bfloat16 model's logits agree within 2 bfloat16 steps at the logits' size, 2**-7
(measured: equal).
"""

from __future__ import annotations

import json

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods.gisp import GispOptions, step_scores
from gisp_plugin.models.loading import load_model, parse_dtype
from gisp_plugin.pruning import run_method
from tests.distributed.fsdp_cases import TARGETS, VARIANTS, calibration, probe_ids
from tests.distributed.launch import torchrun
from tests.tiny import MOE_FAMILIES, tiny_folder, tiny_model, tiny_tokenizer

SCORE_GAP = {"float32": 1e-5, "bfloat16": 2**-8}  # relative to each kind's largest unit score
LOGIT_GAP = {"float32": 1e-5, "bfloat16": 2**-7}  # absolute; the logits are below 1 in size


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[str, dict]:
    """Every case's results on 2 ranks (one torchrun job for all of them)."""
    root = tmp_path_factory.mktemp("fsdp-variants")
    for family in {family for family, *_ in VARIANTS.values() if family not in MOE_FAMILIES}:
        tiny_folder(root, family, tiny_tokenizer())
    job = torchrun("-m", "tests.distributed.fsdp_variants_worker", root, root, timeout=300)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    return {"root": root} | {case: torch.load(root / f"{case}.pt", weights_only=False) for case in VARIANTS}


def one_process(root, case: str):
    family, dtype, method, options = VARIANTS[case]
    if family in MOE_FAMILIES:
        return tiny_model(family).to(parse_dtype(dtype)), None
    return load_model(str(root / f"tiny-{family}"), dtype=dtype)


@pytest.mark.parametrize("case", list(VARIANTS))
def test_sharded_run_prunes_what_one_process_prunes(sharded, case):
    family, dtype, method, options = VARIANTS[case]
    model, tokenizer = one_process(sharded["root"], case)
    anatomy = adapter_for(model).anatomy(model)
    got = sharded[case]
    if method == "gisp":  # the scores of one step on the dense model
        raw, _ = step_scores(model, anatomy, calibration(), GispOptions(**options))
        for key, expected in raw.items():
            gap = float((got["scores"][key] - expected).abs().max() / expected.abs().max())
            assert gap <= SCORE_GAP[dtype], (key, gap)
    subnetworks = list(run_method(model, tokenizer, method, TARGETS, options, calibration=calibration()))
    assert got["keeps"] == json.loads(json.dumps([s.keep.to_json() for s in subnetworks]))
    assert got["sparsities"] == pytest.approx([s.sparsity for s in subnetworks], abs=1e-12)
    assert any(units for layer in got["keeps"][-1].values() for units in layer.values())  # something was pruned

    with MaskedModel(model, anatomy) as masked, torch.no_grad():  # the gathered compacted model = masked dense
        masked.apply(KeepMask.from_json(anatomy, got["keeps"][-1]))
        expected = model(probe_ids()).logits.float()
    torch.testing.assert_close(got["compact_logits"], expected, rtol=0, atol=LOGIT_GAP[dtype])
