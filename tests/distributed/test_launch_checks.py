"""What a torchrun launch is checked for before any model is loaded, and what each rank prints on failure.

These run in the test process with the variables torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)
and no process group: the checks and the choice of error line must not need one.
"""

from __future__ import annotations

import pytest

from gisp_plugin.cli import main
from gisp_plugin.distributed.context import device_for, launch_setup
from gisp_plugin.distributed.failures import JobStopped, error_line
from gisp_plugin.pruning import resolve_method

GLOO_PEER_GONE = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:18837. "
    "This is typically caused by a remote worker crashing."
)


@pytest.fixture
def rank(monkeypatch):
    """Pretend to be rank ``r`` of a 4-rank torchrun job."""

    def become(r: int) -> None:
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("LOCAL_RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", "4")

    return become


def test_fewer_samples_than_ranks_is_refused_before_the_model_is_loaded(rank, tmp_path, capsys):
    rank(0)
    out = tmp_path / "out"
    args = ["prune", "--model", str(tmp_path / "no-such-model"), "--method", "wanda_sp", "--sparsity", "0.2"]
    assert main([*args, "--n-samples", "3", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "gisp prune: error: --n-samples 3 cannot be split across 4 ranks; give at least 4 calibration samples, or fewer ranks"
    ]
    assert not out.exists()


def test_compare_refuses_fewer_samples_than_ranks_with_the_same_check(rank, tmp_path, capsys):
    rank(0)
    out = tmp_path / "out"
    args = ["compare", "--model", str(tmp_path / "no-such-model"), "--methods", "wanda_sp", "--n-samples", "3"]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "gisp compare: error: n_samples=3 cannot be split across 4 ranks; give at least 4 calibration samples, or fewer ranks"
    ]
    assert not out.exists()


def test_flap_reference_fluctuation_is_refused_under_torchrun_only(rank):
    resolve_method("flap", {"fluctuation": "reference"})  # one process: fine
    rank(0)
    assert launch_setup().world_size == 4
    with pytest.raises(ValueError, match="use fluctuation=exact under torchrun"):
        resolve_method("flap", {"fluctuation": "reference"})


def test_rank_0_reports_its_own_errors_and_another_rank_failing(rank):
    rank(0)
    assert error_line("prune", "bad value", ValueError("bad value")) == "gisp prune: error: bad value"
    line = error_line("prune", "ignored", RuntimeError(GLOO_PEER_GONE))
    assert line.startswith("gisp prune: error: another rank of this torchrun job failed or was killed")
    assert "(Connection closed by peer [127.0.0.1]:18837)" in line and "pair.cc" not in line
    assert "(torchrun stopped this rank)" in error_line("prune", "ignored", JobStopped("torchrun stopped this rank"))


def test_other_ranks_report_only_their_own_failures(rank):
    rank(2)
    assert error_line("prune", "bad value", ValueError("bad value")) is None  # every rank finds it; rank 0 says it
    assert error_line("prune", "ignored", RuntimeError(GLOO_PEER_GONE)) is None  # the echo of another rank's failure
    assert error_line("prune", "ignored", JobStopped("torchrun stopped this rank")) is None
    missing = error_line("prune", "no such file /data/x", FileNotFoundError("no such file /data/x"))
    assert missing == "gisp prune: error: [rank 2] no such file /data/x"  # a problem of this rank's node


def test_a_numbered_gpu_for_every_rank_is_refused_and_a_bare_cuda_is_split(rank):
    rank(3)
    assert device_for(launch_setup(), "cuda") == "cuda:3"
    assert device_for(launch_setup(), "cpu") == "cpu"
    with pytest.raises(ValueError, match="--device cuda:0 would put every rank of this node on one GPU; give --device cuda"):
        device_for(launch_setup(), "cuda:0")


def test_commands_that_do_not_split_run_on_rank_0_alone(rank, capsys):
    rank(1)
    assert main(["methods"]) == 0
    assert capsys.readouterr().out == ""  # rank 1 left at once
    rank(0)
    assert main(["methods"]) == 0
    assert "gisp" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("method", "flags", "message"),
    [
        ("gisp", ["--fsdp"], "--fsdp shards the model across ranks: launch with torchrun --nproc-per-node N (N >= 2)"),
        ("gisp", ["--cpu-offload"], "--cpu-offload keeps FSDP shards in CPU memory; give it together with --fsdp"),
    ],
)
def test_sharding_flags_outside_torchrun_are_refused_before_the_model_is_loaded(tmp_path, capsys, method, flags, message):
    out = tmp_path / "out"
    args = ["prune", "--model", str(tmp_path / "no-such-model"), "--method", method, "--sparsity", "0.2", "--out", str(out)]
    assert main([*args, "--device", "cpu", *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"gisp prune: error: {message}"]
    assert not out.exists()


def test_a_method_that_cannot_score_a_sharded_model_is_refused_under_fsdp(rank, tmp_path, capsys):
    rank(0)
    out = tmp_path / "out"
    args = ["prune", "--model", str(tmp_path / "no-such-model"), "--method", "wanda_sp", "--sparsity", "0.2", "--fsdp"]
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "gisp prune: error: method 'wanda_sp' does not run on a model sharded with --fsdp; "
        "run it data parallel (torchrun without --fsdp)"
    ]
    assert not out.exists()


@pytest.mark.parametrize("method", ["gisp", "llm_pruner"])
def test_second_order_taylor_is_refused_under_fsdp_before_the_model_is_loaded(rank, tmp_path, capsys, method):
    """Per-sample squared gradients need each sample's whole gradient, which no FSDP rank holds: the refusal
    comes from the options alone (the model folder does not exist), not from the gradient engine mid-run."""
    rank(0)
    out = tmp_path / "out"
    args = ["prune", "--model", str(tmp_path / "no-such-model"), "--method", method, "--sparsity", "0.2", "--fsdp"]
    assert main([*args, "-o", "taylor=param_mix", "--out", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"gisp prune: error: method {method!r}: taylor=param_mix squares each sample's own gradients, which no rank "
        "holds whole under --fsdp; run it data parallel (torchrun without --fsdp)"
    ]
    assert not out.exists()
