"""benchmarks/gpu_check.sh: the whole check run for real as its CPU dry run, every row in the table and the JSON."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

ROW_IDS = [row_id for row_id, _ in gpu_check.ROWS]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``bash benchmarks/gpu_check.sh --cpu-dry-run --json ...`` once, with this interpreter (1-3 minutes on 2 cores)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, GISP_PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run", "--json", str(tmp / "check.json")]
    cmd += ["--workdir", str(tmp / "work")]
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    log = tmp / "work" / "log.txt"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + (log.read_text()[-3000:] if log.exists() else "")
    return done.stdout, json.loads((tmp / "check.json").read_text())


def test_the_table_has_every_row_once_and_none_failed(dry_run):
    out, _ = dry_run
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| row | check | measured")
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == ROW_IDS
    assert "FAILED" not in out
    assert "int8wo stands in for int4wo and int8dq for fp8dq" in out


def test_the_json_has_every_row_with_its_measurements(dry_run):
    _, data = dry_run
    assert data["dry_run"] is True and data["device"] == "cpu" and data["backend"] == "gloo"
    rows = {row["id"]: row for row in data["rows"]}
    assert [row["id"] for row in data["rows"]] == ROW_IDS
    assert all(row["ok"] for row in rows.values())

    steps = rows["prune.step_time"]["values"]["step_times_s"]
    assert len(steps) == 2 and all(t > 0 for t in steps)  # steps=2: two gradient steps read from trajectory.json
    memory = rows["prune.peak_memory"]["values"]
    assert memory["measured_bytes"] > 0 and memory["plan_bytes"] == memory["plan"]["device_total"] > 0

    for row_id in ("compact.dense", "compact.padded", "compact.unpadded"):
        values = rows[row_id]["values"]
        assert values["tokens_per_s"] > 0 and values["decode_tokens_per_s"] > 0
    assert rows["compact.dense"]["values"]["mlp_widths"] == [344]
    assert all(width % 64 == 0 for width in rows["compact.padded"]["values"]["mlp_widths"])
    assert any(width % 64 for width in rows["compact.unpadded"]["values"]["mlp_widths"])
    assert rows["compact.padded"]["values"]["logits_vs_unpadded_max_abs"] < 1e-4  # zero channels change nothing

    for row_id, stand_in in (("quant.int4wo", "int8wo"), ("quant.fp8dq", "int8dq")):
        values = rows[row_id]["values"]
        assert values["ran"] == stand_in and f"CPU stand-in for {row_id.split('.')[1]}" in rows[row_id]["note"]
        assert values["reload_logits_max_abs"] == 0.0 and values["reloaded_as"].startswith("Int8")
        assert 0 < values["weights_bytes"] < values["unquantised_bytes"]

    refused = rows["fsdp.cli_one_rank"]
    assert refused["values"]["rank_exit"] == 2
    assert refused["note"] == "--fsdp shards the model across ranks: launch with torchrun --nproc-per-node N (N >= 2)"
    fsdp = rows["fsdp.one_rank"]["values"]
    assert fsdp["world_size"] == 1 and fsdp["backend"] == "gloo"
    assert fsdp["structures_differing"] == 0 and fsdp["structures"] > 0  # one FSDP rank prunes what the CLI pruned
    assert fsdp["compact_params"] > 0 and len(fsdp["step_times_s"]) == 2


def test_a_missing_package_is_named_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "NEEDED", ("torch", "no_such_package_for_gpu_check"))
    assert gpu_check.main(["--cpu-dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "lacks no_such_package_for_gpu_check;" in err and "pip install --no-index" in err


def test_the_cuda_memory_cells_read_the_allocator():
    cuda = gpu_check.setting(dry_run=False)
    measured, text = gpu_check.memory_text(cuda, {"peak_allocated": 50 * 2**30, "peak_reserved": 52 * 2**30})
    assert measured == 50 * 2**30 and text == "50.0 GiB allocated (52.0 reserved)"
    assert gpu_check.ratio(cuda, measured, 40 * 2**30) == " (measured x1.25)"
    assert gpu_check.ratio(gpu_check.setting(dry_run=True), measured, 40 * 2**30) == ""
    assert cuda.quants == {"int4wo": "int4wo", "fp8dq": "fp8dq"} and cuda.backend == "nccl"
    assert cuda.shape["hidden_size"] == 4096 and cuda.shape["num_hidden_layers"] == 32


def test_help():
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--help"])
    assert exit_info.value.code == 0


def test_a_child_past_the_deadline_is_stopped_with_its_own_children(tmp_path):
    """A hung torchrun must not hold the GPU past the check: the whole process group goes at the deadline."""
    s = gpu_check.setting(dry_run=True, timeout_s=1.0)
    marker = tmp_path / "grandchild.pid"
    script = f"sleep 60 & echo $! > {marker}; wait"
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"stopped at the check's time limit \(1 s\)"):
        gpu_check.run_child(["bash", "-c", script], tmp_path / "log.txt", s)
    assert time.monotonic() - started < 15  # not the 60 s of the grandchild, which kept the output pipe open
    grandchild = int(marker.read_text())
    for _ in range(50):  # SIGKILL is delivered asynchronously; the zombie is reaped by init
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the grandchild {grandchild} outlived the deadline")
