"""One writer per `--out` folder: real concurrent `gisp prune` processes, an OS lock, stale locks taken over.

The second process is started while the first holds the folder (the first is paused with SIGSTOP right
after its lock file names it, so the timing never decides the outcome).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gisp_plugin.checkpoint.locking import lock_path
from gisp_plugin.cli import main
from tests.tiny import tiny_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return tiny_folder(tmp_path_factory.mktemp("locking"), "llama", tokenizer)[0]


def prune(model_dir, out, sparsity, *extra) -> list[str]:
    return ["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", sparsity, "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "HF_HUB_OFFLINE": "1"}


def _start(args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "gisp_plugin", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _run(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gisp_plugin", *args]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)


def _wait_for_lock(process: subprocess.Popen, out) -> dict:
    """The holder record, once ``process`` holds the lock of ``out`` and has written who it is."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            holder = json.loads(lock_path(out).read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        if holder.get("pid") == process.pid:
            return holder
    raise AssertionError("the first run never took the lock")


def _results_exist(out) -> None:
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished"
    for result in run["results"]:
        assert (out / os.path.basename(result["folder"]) / "pruning.json").exists(), result


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(model_dir, tmp_path, overwrite):
    out = tmp_path / "out"
    extra = ["--overwrite"] if overwrite else []
    if overwrite:  # an earlier run that both overwriting runs want to replace
        assert main(prune(model_dir, out, "0.5")) == 0
    first = _start(prune(model_dir, out, "0.2", *extra))
    try:
        _wait_for_lock(first, out)
        first.send_signal(signal.SIGSTOP)
        second = _run(prune(model_dir, out, "0.3", *extra))
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"gisp prune: error: --out folder {str(out)!r} is being written by another gisp process ")
    assert f"(pid {first.pid} on " in lines[0] and "--sparsity 0.2" in lines[0]
    assert lines[0].endswith("wait for it to finish, or choose another --out")
    run = json.loads((out / "run.json").read_text())
    assert run["request"]["targets"] == [0.2]  # the first run's folder, whole, and nothing of the second
    assert sorted(p.name for p in out.iterdir()) == ["magnitude-s0.20", "run.json", "trajectory.json"]
    _results_exist(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no lock, staging or replaced folder left


def test_the_lock_of_a_killed_run_is_taken_over(model_dir, tmp_path):
    out = tmp_path / "out"
    first = _start(prune(model_dir, out, "0.2"))
    _wait_for_lock(first, out)
    first.kill()  # SIGKILL: no cleanup runs, the lock file stays, the kernel drops the lock
    first.wait(timeout=60)
    assert lock_path(out).exists()
    again = _run(prune(model_dir, out, "0.2"))
    assert again.returncode == 0, again.stderr
    _results_exist(out)
    assert not lock_path(out).exists()


HOLDER = """
import sys
from gisp_plugin.checkpoint.locking import hold_folder
with hold_folder(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_folder_held_elsewhere_is_refused_before_loading_and_the_lock_is_let_go_after_every_run(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(prune(model_dir, out, "0.2")) == 2
        assert f"(pid {holder.pid} on " in capsys.readouterr().err
    finally:
        holder.communicate("")
    assert not out.exists()
    assert main(prune(model_dir, out, "1.5")) == 2  # a failed check holds nothing afterwards
    assert main(prune(model_dir, out, "0.2")) == 0
    assert main(prune(model_dir, out, "0.2")) == 0  # released after the first run: the same run resumes
    assert not lock_path(out).exists()


def test_a_comparison_folder_held_elsewhere_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "compare"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(["compare", "--model", str(model_dir), "--methods", "magnitude", "--out", str(out)]) == 2
    finally:
        holder.communicate("")
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and f"--out folder {str(out)!r} is being written by another gisp process (pid {holder.pid} on " in err[0]
    assert err[0].endswith("wait for it to finish, or give another --out")
    assert not out.exists()
