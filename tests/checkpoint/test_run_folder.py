"""`gisp prune --out`: another run's folder is refused, --overwrite replaces it whole, the same run resumes."""

import json
import logging

import pytest

from gisp_plugin.cli import main
from tests.gisp_steps import GispSteps
from tests.tiny import tiny_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    return tiny_folder(tmp_path_factory.mktemp("run-folder"), "llama", tokenizer)  # model folder, text file


@pytest.fixture(scope="module")
def model_dir(folders):
    return folders[0]


def prune(model_dir, out, sparsity, *extra, method: str = "magnitude") -> list[str]:
    return ["prune", "--model", str(model_dir), "--method", method, "--sparsity", sparsity, "--out", str(out), *extra]


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


def gisp_run(model_dir, text, out, steps: GispSteps) -> int:
    """``gisp prune`` with GISP (4 gradient steps, two targets) into ``out``, its computed steps in ``steps``."""
    logger = logging.getLogger("gisp_plugin.methods.gisp")
    logger.addHandler(steps)
    try:
        return main(["-v", *prune(model_dir, out, "0.2,0.4", method="gisp"), "-o", "steps=4",
                     "--calibration", f"file:{text}", "--n-samples", "2", "--seqlen", "16"])  # fmt: skip
    finally:
        logger.removeHandler(steps)


def test_the_same_run_again_resumes_in_place(folders, tmp_path):
    model_dir, text = folders
    whole = GispSteps()
    assert gisp_run(model_dir, text, tmp_path / "whole", whole) == 0
    assert whole.computed == [1, 2, 3, 4] and not whole.resumed

    out = tmp_path / "out"
    first = GispSteps(stop_after=2)
    assert gisp_run(model_dir, text, out, first) == 130  # interrupted after step 2 of 4
    assert first.computed == [1, 2] and (out / ".work" / "gisp-state.json").exists()
    again = GispSteps()
    assert gisp_run(model_dir, text, out, again) == 0
    assert again.resumed == [f"gisp: resuming from {out / '.work'} after 2 of 4 steps"]
    assert again.computed == [3, 4]  # the saved steps were read, not redone
    for target in ("0.20", "0.40"):  # and the resumed run reached what the uninterrupted one did
        resumed = json.loads((out / f"gisp-s{target}" / "pruning.json").read_text())
        reference = json.loads((tmp_path / "whole" / f"gisp-s{target}" / "pruning.json").read_text())
        assert resumed["pruned_structures"] == reference["pruned_structures"]
    finished = GispSteps()
    assert gisp_run(model_dir, text, out, finished) == 0  # a finished run, run again, computes nothing
    assert finished.computed == []


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


def test_a_failing_overwrite_keeps_the_old_run(folders, tmp_path):
    model_dir, text = folders
    out = tmp_path / "out"
    assert main(prune(model_dir, out, "0.2")) == 0
    before = snapshot(out)
    stopped = GispSteps(stop_after=1)  # the new run stops after its first step has written state
    logger = logging.getLogger("gisp_plugin.methods.gisp")
    logger.addHandler(stopped)
    try:
        argv = [*prune(model_dir, out, "0.2,0.4", "--overwrite", method="gisp"), "-o", "steps=4"]
        code = main(["-v", *argv, "--calibration", f"file:{text}", "--n-samples", "2", "--seqlen", "16"])
    finally:
        logger.removeHandler(stopped)
    assert code == 130 and stopped.computed == [1]
    assert snapshot(out) == before  # the old run, byte for byte
