"""`gisp prune --out`: another run's folder is refused, --overwrite replaces it whole, the same run resumes."""

import json

import pytest

from gisp_plugin.cli import main
from tests.tiny import tiny_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return tiny_folder(tmp_path_factory.mktemp("run-folder"), "llama", tokenizer)[0]


def prune(model_dir, out, sparsity, *extra) -> list[str]:
    return ["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", sparsity, "--out", str(out), *extra]


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_another_run_is_refused_and_left_untouched(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(prune(model_dir, out, "0.2")) == 0
    before = snapshot(out)
    assert main(prune(model_dir, out, "0.3")) == 2
    err = capsys.readouterr().err
    assert "holds another run (magnitude on" in err and "targets differ" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_overwrite_replaces_the_folder_whole(model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(prune(model_dir, out, "0.2,0.4")) == 0
    assert main(prune(model_dir, out, "0.3", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["magnitude-s0.30", "run.json", "trajectory.json"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["request"]["targets"] == [0.3]
    assert [r["folder"] for r in run["results"]] == [str(out / "magnitude-s0.30")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or replaced folder left beside it


def test_the_same_run_again_resumes_in_place(model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(prune(model_dir, out, "0.2")) == 0
    records = (out / "magnitude-s0.20" / "pruning.json").read_text()
    assert main(prune(model_dir, out, "0.2")) == 0
    assert (
        json.loads((out / "magnitude-s0.20" / "pruning.json").read_text())["pruned_structures"]
        == (json.loads(records)["pruned_structures"])
    )


def test_a_folder_of_other_files_is_refused_even_with_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main(prune(model_dir, out, "0.2", *extra)) == 2
        assert "is not empty and holds no gisp prune run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_a_run_that_fails_before_any_result_leaves_no_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(prune(model_dir, out, "0.9995")) == 2  # above what the layers can give: known only with the model
    assert "above what the prunable layers can give" in capsys.readouterr().err
    assert not out.exists()
