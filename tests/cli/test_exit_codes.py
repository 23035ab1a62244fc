"""One exit status per kind of outcome (0 done, 2 fixable and named, 1 unforeseen, 130 interrupted), and
SIGTERM handled like Ctrl-C: finished work kept, the message says how to resume."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gisp_plugin.checkpoint.locking import lock_path
from gisp_plugin.cli import _environment_error, build_parser, main
from tests.tiny import tiny_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    return tiny_folder(tmp_path_factory.mktemp("exit-codes"), "llama", tokenizer)


def test_help_documents_the_exit_codes():
    epilog = build_parser().epilog
    for code in ("0 done", "2 refused", "1 an unforeseen failure", "130 interrupted (Ctrl-C or SIGTERM)"):
        assert code in epilog


def test_sigterm_stops_like_ctrl_c_keeps_finished_work_and_says_how_to_resume(folders, tmp_path):
    model_dir, text = folders
    out = tmp_path / "out"
    args = ["prune", "--model", str(model_dir), "--method", "gisp", "--sparsity", "0.2,0.5", "--out", str(out)]
    args += ["-o", "steps=60", "--calibration", f"file:{text}", "--n-samples", "8", "--seqlen", "32"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "gisp_plugin", *args], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (out / ".work").is_dir() and time.monotonic() < deadline:  # GISP has started its steps
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    err = process.stderr.read()
    assert process.wait(timeout=120) == 130, err
    assert err.strip().splitlines()[-1] == (
        "gisp prune: interrupted (SIGTERM); finished results are kept; run the same command again to resume"
    )
    assert not lock_path(out).exists()  # the lock was let go on the way out
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # kept for the resume


def test_an_offline_hub_dataset_is_refused_before_the_model_loads(folders, tmp_path, monkeypatch, capsys):
    model_dir, _ = folders
    broken = tmp_path / "model"
    broken.mkdir()
    for file in model_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "model.safetensors").write_bytes(b"x" * 10)  # loading it would fail with another message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["prune", "--model", str(broken), "--method", "magnitude", "--sparsity", "0.3", "--out", str(tmp_path / "o")]
    assert main([*args, "--calibration", "c4", "--recover-steps", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith(
        "gisp prune: error: data source 'c4' reads the Hugging Face dataset allenai/c4, but the Hub is offline here"
    )
    assert "lambada-novels" in err[0] and "file:PATH" in err[0] and "DatasetUnavailableError" not in err[0]


def test_a_full_disk_behind_a_library_error_is_found():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")
        except OSError as disk:
            raise RuntimeError("PytorchStreamWriter failed writing file") from disk
    except RuntimeError as wrapped:
        found = _environment_error(wrapped)
    assert found is not None and found.errno == errno.ENOSPC
    assert _environment_error(RuntimeError("a bug")) is None
