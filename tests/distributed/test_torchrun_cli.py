"""``torchrun --nproc-per-node 2 -m gisp_plugin prune|compare``: one job on two gloo ranks, rank 0 writes.

Checked against the same command in one process: the same pruned structures in ``pruning.json``, the
compacted model equal to the dense model under the same masks (logits within 1e-4 relative, 1e-5
absolute), outputs printed once, and a rank killed mid-calibration stopping the job with one error line
and no output folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.cli import main
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.pruning import run_method
from tests.distributed.launch import ROOT, error_lines, torchrun, torchrun_command, torchrun_env
from tests.tiny import random_ids, tiny_folder


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tokenizer):
    """A tiny grouped-query-attention model saved with its tokenizer, and a text file to calibrate on."""
    return tiny_folder(tmp_path_factory.mktemp("dense"), "qwen2", tokenizer)


def _prune_args(model_dir: Path, text: Path, out: Path, method: str, *options: str, n_samples: int = 7) -> list[str]:
    args = ["prune", "--model", model_dir, "--method", method, "--sparsity", "0.2,0.4", "--out", out, "--device", "cpu"]
    args += ["--calibration", f"file:{text}", "--n-samples", str(n_samples), "--seqlen", "16"]
    return [str(a) for a in args] + [part for option in options for part in ("-o", option)]


def _records(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/pruning.json"))}


def test_prune_on_two_ranks_writes_what_one_process_writes(dense, tmp_path, capsys):
    model_dir, text = dense
    options = ("steps=3", "protect=none")
    job = torchrun("-m", "gisp_plugin", *_prune_args(model_dir, text, tmp_path / "ranks", "gisp", *options))
    assert job.returncode == 0, job.stderr[-3000:]
    assert main(_prune_args(model_dir, text, tmp_path / "one", "gisp", *options)) == 0
    one_printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    printed = [json.loads(line) for line in job.stdout.splitlines()]  # rank 0 alone prints, once per target
    assert [p["target"] for p in printed] == [p["target"] for p in one_printed] == [0.2, 0.4]
    ranks, one = _records(tmp_path / "ranks"), _records(tmp_path / "one")
    assert sorted(ranks) == sorted(one) == ["gisp-s0.20", "gisp-s0.40"]
    for name, record in ranks.items():
        assert record["pruned_structures"] == one[name]["pruned_structures"]
        assert record["distributed"] == {"world_size": 2, "backend": "gloo", "fsdp": False}
        assert one[name]["distributed"] == {"world_size": 1, "backend": None, "fsdp": False}
    run = json.loads((tmp_path / "ranks" / "run.json").read_text())
    assert run["status"] == "finished" and run["request"] == json.loads((tmp_path / "one" / "run.json").read_text())["request"]
    assert (tmp_path / "ranks" / "trajectory.json").exists()
    assert not list((tmp_path / "ranks").glob(".*partial*"))

    dense_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    anatomy = adapter_for(dense_model).anatomy(dense_model)
    ids = random_ids()
    for name, record in ranks.items():
        compact = AutoModelForCausalLM.from_pretrained(tmp_path / "ranks" / name, trust_remote_code=True).eval()
        with MaskedModel(dense_model, anatomy) as masked, torch.no_grad():
            masked.apply(KeepMask.from_json(anatomy, record["pruned_structures"]))
            torch.testing.assert_close(compact(ids).logits, dense_model(ids).logits, rtol=1e-4, atol=1e-5)


def test_prune_with_fsdp_shards_the_model_and_writes_what_one_process_writes(dense, tmp_path):
    """``--fsdp``: each rank loads its shard, GISP scores the sharded model, rank 0 writes each gathered compacted model."""
    model_dir, text = dense
    options = ("steps=2", "protect=none")
    job = torchrun("-m", "gisp_plugin", *_prune_args(model_dir, text, tmp_path / "fsdp", "gisp", *options), "--fsdp")
    assert job.returncode == 0, job.stderr[-3000:]
    assert main(_prune_args(model_dir, text, tmp_path / "one", "gisp", *options)) == 0
    printed = [json.loads(line) for line in job.stdout.splitlines()]
    assert [p["target"] for p in printed] == [0.2, 0.4]
    sharded, one = _records(tmp_path / "fsdp"), _records(tmp_path / "one")
    assert sorted(sharded) == sorted(one) == ["gisp-s0.20", "gisp-s0.40"]
    dense_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    anatomy = adapter_for(dense_model).anatomy(dense_model)
    ids = random_ids()
    for name, record in sharded.items():
        assert record["pruned_structures"] == one[name]["pruned_structures"]
        assert record["params"] == one[name]["params"]
        assert record["distributed"] == {"world_size": 2, "backend": "gloo", "fsdp": True}
        compact = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / name, trust_remote_code=True).eval()
        with MaskedModel(dense_model, anatomy) as masked, torch.no_grad():
            masked.apply(KeepMask.from_json(anatomy, record["pruned_structures"]))
            torch.testing.assert_close(compact(ids).logits, dense_model(ids).logits, rtol=1e-4, atol=1e-5)


def test_compare_on_two_ranks_prunes_together_and_rank_0_evaluates(dense, tmp_path):
    model_dir, text = dense
    out = tmp_path / "compare"
    args = ["compare", "--model", model_dir, "--methods", "wanda_sp,llm_pruner", "--sparsity", "0.2,0.4"]
    args += ["--eval", f"perplexity:source=file:{text},seqlen=16,max_windows=4", "--calibration", f"file:{text}"]
    args += ["--n-samples", "5", "--seqlen", "16", "--device", "cpu", "--save-models", "--out", out]
    args += ["-o", "llm_pruner.layer_start=0", "-o", "llm_pruner.layer_end=3"]
    job = torchrun("-m", "gisp_plugin", *args)
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("| method | dense | 20% | 40% |") == 1  # the table, printed by rank 0 alone

    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["target"]) for r in rows] == [
        ("dense", 0.0),
        ("wanda_sp", 0.2),
        ("wanda_sp", 0.4),
        ("llm_pruner", 0.2),
        ("llm_pruner", 0.4),
    ]
    dense_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    calibration = _calibration(dense_model, text, 5)
    records = _records(out / "models")
    for method, options in (("wanda_sp", {}), ("llm_pruner", {"layer_start": 0, "layer_end": 3})):
        for subnetwork in run_method(dense_model, None, method, [0.2, 0.4], options, calibration):
            record = records[f"{method}-s{subnetwork.target:.2f}"]
            assert record["pruned_structures"] == subnetwork.keep.to_json()
            assert record["distributed"]["world_size"] == 2


def _calibration(model, text: Path, n_samples: int):
    from gisp_plugin.data.api import CalibrationRequest
    from gisp_plugin.data.loading import load_calibration
    from tests.tiny import tiny_tokenizer

    return load_calibration(CalibrationRequest(f"file:{text}", n_samples, 16, 0), tiny_tokenizer())


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker torchrun started for ``rank`` (read from each child's environment)."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0") if parent == launcher.pid else []
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


def test_a_killed_rank_stops_the_job_with_one_error_and_no_output_folder(dense, tmp_path):
    model_dir, text = dense
    out = tmp_path / "killed"
    # LLM-Pruner's second-order Taylor score takes one backward per sequence: long enough to be killed in
    args = _prune_args(model_dir, text, out, "llm_pruner", "taylor=param_second", "layer_start=0", "layer_end=3", n_samples=256)
    launcher = subprocess.Popen(
        torchrun_command("-m", "gisp_plugin", *args),
        env=torchrun_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "run.json").exists():  # rank 0 claims the folder once every rank has joined the job
            assert launcher.poll() is None and time.monotonic() < deadline, "the job ended before it started calibrating"
            time.sleep(0.02)
        victim = _rank_pid(launcher, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    lines = error_lines(stderr, "prune")
    assert len(lines) == 1, stderr[-3000:]
    assert "another rank of this torchrun job failed or was killed" in lines[0]
    assert not out.exists()
