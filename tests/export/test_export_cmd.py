"""`gisp export` from the command line: one line for what it wrote, one clear line (exit 2) for each bad input,
and nothing half-written when it fails."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.saving import save_pruned
from gisp_plugin.export.api import ExportFormat, ExportOptions
from gisp_plugin.export.run import write_atomically
from tests.tiny import random_keep, record_for, tiny_model


def gisp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gisp_plugin", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer):
    folders = {}
    root = tmp_path_factory.mktemp("pruned")
    for family in ("qwen2", "gemma2"):
        model = tiny_model(family)
        adapter = adapter_for(model)
        anatomy = adapter.anatomy(model)
        keep = random_keep(anatomy, seed=3, p_keep=0.6)
        compact = adapter.compact(model, keep)
        folders[family] = save_pruned(compact, tokenizer, root / family, record_for(compact, anatomy, keep))
    return folders


def _one_error_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line and "W1203" not in line]
    errors = [line for line in lines if line.startswith("gisp export: error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1, done.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0]


def test_export_prints_one_line_with_what_padding_costs(tmp_path, pruned):
    done = gisp("export", str(pruned["qwen2"]), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip()
    assert "\n" not in line and "exact" in line and "decoder parameters" in line
    assert (tmp_path / "m.gguf").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--format", "ggml"], ["unknown export format 'ggml'", "gguf, hf, nemotron-nas"]),
        (["--format", "gguf", "--type", "q4_k"], ["invalid choice: 'q4_k'"]),
    ],
)
def test_bad_options_are_refused_in_one_line(tmp_path, pruned, args, fragments):
    done = gisp("export", str(pruned["qwen2"]), "--out", str(tmp_path / "x"), *args)
    if "--type" in args:  # argparse's own message: first line names the value, second points at --help
        assert done.returncode == 2 and fragments[0] in done.stderr
        return
    _one_error_line(done, *fragments)
    assert not (tmp_path / "x").exists()


def test_a_folder_that_is_no_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_error_line(
        gisp("export", str(tmp_path / "empty"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")), "no config.json"
    )


def test_an_existing_out_is_refused_before_loading(tmp_path, pruned):
    (tmp_path / "m.gguf").write_text("keep me")
    done = gisp("export", str(pruned["qwen2"]), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    _one_error_line(done, "already exists")
    assert (tmp_path / "m.gguf").read_text() == "keep me"


def test_a_family_the_format_cannot_express_is_refused_naming_what_works(tmp_path, pruned):
    done = gisp("export", str(pruned["gemma2"]), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    _one_error_line(done, "'gemma2'", "--format hf")
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_llama_cpp_cannot_split_is_refused_and_leaves_nothing(tmp_path, pruned):
    source = tmp_path / "source"
    shutil.copytree(pruned["qwen2"], source)
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (source / "tokenizer.json").write_text(json.dumps(tokenizer))
    done = gisp("export", str(source), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    _one_error_line(done, "pre-tokenizer", "--tokenizer-pre")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


@pytest.mark.parametrize("stop", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_write_that_fails_or_is_stopped_halfway_leaves_nothing(tmp_path, stop):
    def write(model, folder, out, options):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise stop

    fmt = ExportFormat("half", "writes half, then fails", single_file=False, check=lambda m, o: None, write=write)
    with pytest.raises(type(stop)):
        write_atomically(fmt, None, tmp_path, tmp_path / "out", ExportOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == []
