"""Data-parallel calibration: two gloo ranks under torchrun get what one process gets, for every method.

One torchrun job (``dp_worker``) computes gradient sums, activation statistics and the subnetworks of every
method on 2 ranks; the same function runs here in one process. Tolerances: float32 gradient sums over 7
sequences added in another order agree to 1e-5 of their largest entry; float64 statistics (Chan-merged) to
1e-12; pruned structures exactly; FLAP's compensation biases (float32, the model's dtype) to 1e-6 and SlimGPT's
compensated weights to 1e-5 of their largest entry.
"""

from __future__ import annotations

import pytest
import torch

from gisp_plugin.methods.gisp import STATE_FILE
from tests.distributed.dp_worker import METHODS, everything
from tests.distributed.launch import torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one process's results, two ranks' results, the folder the ranks ran in)."""
    root = tmp_path_factory.mktemp("dp")
    single = everything(root / "single-work")
    job = torchrun("-m", "tests.distributed.dp_worker", root)
    assert job.returncode == 0, job.stderr[-3000:]
    return single, torch.load(root / "results.pt", weights_only=False), root


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def test_the_ranks_record_their_setup(runs):
    assert runs[1]["setup"] == {"world_size": 2, "backend": "gloo", "fsdp": False}


@pytest.mark.parametrize("loss", ["ntp", "margin"])
def test_gradient_sums_are_the_whole_set_sums(runs, loss):
    single, ranks = runs[0]["gradients"][loss], runs[1]["gradients"][loss]
    assert (ranks["n_samples"], ranks["n_tokens"]) == (single["n_samples"], single["n_tokens"]) == (7, 93)
    assert ranks["loss"] == pytest.approx(single["loss"], rel=1e-6)
    for path, grad in single["grad"].items():
        assert _relative_gap(grad, ranks["grad"][path]) < 1e-5, path
    if loss == "margin":  # per-sample squares (LLM-Pruner's acc), weighted by |w_i| of the whole set
        for path, grad_sq in single["grad_sq"].items():
            assert _relative_gap(grad_sq, ranks["grad_sq"][path]) < 1e-5, path


def test_layer_statistics_are_merged_over_ranks(runs):
    single, ranks = runs[0]["statistics"], runs[1]["statistics"]
    assert sorted(single) == sorted(ranks) == [0, 1, 2]
    for layer, modules in single.items():
        for path, stats in modules.items():
            assert ranks[layer][path]["n_tokens"] == stats["n_tokens"] == 93
            for name in ("mean", "variance", "squared_norm"):
                assert _relative_gap(stats[name], ranks[layer][path][name]) < 1e-12, (layer, path, name)


@pytest.mark.parametrize("name", [name for name, _, _ in METHODS] + ["reap", "flap_moe"])
def test_every_method_prunes_the_structures_one_process_prunes(runs, name):
    single, ranks = runs[0][name], runs[1][name]
    assert [s["keep"] for s in ranks] == [s["keep"] for s in single]
    assert [s["sparsity"] for s in ranks] == [s["sparsity"] for s in single]
    for one, two in zip(single, ranks, strict=True):
        assert one["biases"].keys() == two["biases"].keys()
        for path, bias in one["biases"].items():
            assert _relative_gap(bias.double(), two["biases"][path].double()) < 1e-6, path
        assert one["weights"].keys() == two["weights"].keys()
        for path, weight in one["weights"].items():  # SlimGPT: float64 solves on merged Gram sums, kept in float32
            assert _relative_gap(weight.double(), two["weights"][path].double()) < 1e-5, path


def test_gisp_state_is_written_by_rank_0_only_and_resumed_by_every_rank(runs):
    _, ranks, root = runs
    assert (root / "work-rank0" / STATE_FILE).exists()
    assert not (root / "work-rank1").exists()  # rank 1 was given its own folder: it wrote nothing there
    first, resumed = ranks["gisp_resumed"]
    # the second run replayed rank 0's state on both ranks (a rank computing gradients alone would hang)
    assert [s["keep"] for s in first] == [s["keep"] for s in resumed] == [s["keep"] for s in ranks["gisp"]]
