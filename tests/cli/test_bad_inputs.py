"""Bad inputs and damaged files through the real `gisp` entry: one clear line each, nothing left behind.

Each test here stood for a finding of issue 11 and failed before its fix: zero values replaced by
defaults, contexts longer than the model, damaged or pickle-only weights, NaN weights pruned and
evaluated without a word, unwritable output.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gisp_plugin.cli import main
from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.finite import NonFiniteError
from gisp_plugin.importance.allocation import prune_lowest_globally
from gisp_plugin.importance.uniform import keep_lowest
from gisp_plugin.inputs import InputError
from gisp_plugin.pruning import run_method
from tests.cli.clear_error import assert_clear_error
from tests.tiny import tiny_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("bad-inputs")
    model_dir, text = tiny_folder(root, "llama", tokenizer)  # max_position_embeddings 128
    return root, model_dir, text


def gisp(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of one command (what the test printed before it is dropped)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def copy_with(folder, dest, change):
    """A copy of a model folder whose weights are changed by ``change(model)`` and saved again."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        change(model)
    model.save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, dest / name)
    return dest


@pytest.mark.parametrize("flag", ["--n-samples", "--seqlen"])
def test_zero_is_refused_not_replaced_by_the_default(folders, tmp_path, capsys, flag):
    _, model_dir, text = folders
    out = tmp_path / "out"
    code, err = gisp(capsys, "prune", "--model", model_dir, "--method", "wanda_sp", "--sparsity", "0.2", "--out", out,
                     "--calibration", f"file:{text}", flag, "0")  # fmt: skip
    assert_clear_error(code, err, "prune", [f"argument {flag}: 0 is below the minimum"])
    assert not out.exists()


def test_calibration_falls_back_only_on_flags_not_given():
    from gisp_plugin.plugins.manager import lookup
    from gisp_plugin.prune_request import calibration_for

    spec = lookup("method", "wanda_sp")
    request = calibration_for(spec, source=None, n_samples=None, seqlen=7, seed=0)
    assert (request.source, request.n_samples, request.seqlen) == ("c4", 128, 7)


def test_seqlen_beyond_the_model_is_refused_before_loading(folders, tmp_path, capsys):
    _, model_dir, text = folders
    out = tmp_path / "out"
    code, err = gisp(capsys, "prune", "--model", model_dir, "--method", "wanda_sp", "--sparsity", "0.2", "--out", out,
                     "--calibration", f"file:{text}", "--n-samples", "2", "--seqlen", "129")  # fmt: skip
    line = assert_clear_error(code, err, "prune", ["calibration seqlen=129 is longer than model"])
    assert "max_position_embeddings=128" in line
    assert not out.exists()
    code, err = gisp(capsys, "eval", "--model", model_dir, "--eval", f"perplexity:source=file:{text},seqlen=200")
    assert_clear_error(code, err, "eval", ["seqlen=200 is longer than model"])


def test_seqlen_beyond_the_model_is_refused_by_the_python_api(folders):
    _, model_dir, text = folders
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(InputError, match="seqlen=129 is longer than model"):
        next(run_method(model, None, "wanda_sp", [0.2], calibration=CalibrationRequest(f"file:{text}", 2, 129)))


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_safetensors_is_named(folders, tmp_path, capsys, damage):
    _, model_dir, text = folders
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        data[: len(data) * 9 // 10] if damage == "truncated" else torch.randint(0, 256, (5000,)).byte().numpy().tobytes()
    )
    code, err = gisp(capsys, "eval", "--model", broken, "--eval", f"perplexity:source=file:{text},seqlen=16")
    assert_clear_error(code, err, "eval", [f"weights file '{weights}' is damaged or truncated"])


def test_pickle_only_folder_is_refused(folders, tmp_path, capsys):
    _, model_dir, text = folders
    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    code, err = gisp(capsys, "eval", "--model", pickled, "--eval", f"perplexity:source=file:{text},seqlen=16")
    line = assert_clear_error(code, err, "eval", ["has no .safetensors weights (found pytorch_model.bin"])
    assert "never loads" in line


@pytest.mark.parametrize("method", ["magnitude", "wanda_sp"])
def test_nan_weights_stop_pruning_and_write_nothing(folders, tmp_path, capsys, method):
    root, model_dir, text = folders
    nan_dir = tmp_path / "nan"
    copy_with(model_dir, nan_dir, lambda m: m.model.layers[1].mlp.down_proj.weight.__setitem__((0, 0), float("nan")))
    out = tmp_path / "out"
    code, err = gisp(capsys, "prune", "--model", nan_dir, "--method", method, "--sparsity", "0.2", "--out", out,
                     "--calibration", f"file:{text}", "--n-samples", "2", "--seqlen", "16")  # fmt: skip
    assert_clear_error(code, err, "prune", ["weight model.layers.1.mlp.down_proj.weight holds inf or NaN"])
    assert not out.exists()


def test_non_finite_outputs_stop_evaluation(folders, tmp_path, capsys):
    _, model_dir, text = folders
    nan_dir = copy_with(
        model_dir, tmp_path / "nan", lambda m: m.model.layers[0].mlp.down_proj.weight.__setitem__((0, 0), float("inf"))
    )
    code, err = gisp(capsys, "eval", "--model", nan_dir, "--eval", f"perplexity:source=file:{text},seqlen=16")
    assert_clear_error(code, err, "eval", ["weight model.layers.0.mlp.down_proj.weight holds inf or NaN"])
    # finite weights whose activations overflow: the metric itself is refused
    huge = copy_with(model_dir, tmp_path / "huge", lambda m: m.model.norm.weight.fill_(3e38))
    code, err = gisp(capsys, "eval", "--model", huge, "--eval", f"perplexity:source=file:{text},seqlen=16,max_windows=2")
    line = assert_clear_error(code, err, "eval", ["ppl["])
    assert "= nan" in line and "not finite" in line


def test_nan_scores_are_refused_by_both_allocators(tiny):
    from gisp_plugin.adapters.api import adapter_for

    anatomy = adapter_for(tiny).anatomy(tiny)
    scores = {(layer.index, name): torch.rand(kind.count) for layer in anatomy.layers for name, kind in layer.kinds.items()}
    key = next(iter(scores))
    scores[key][0] = float("nan")
    with pytest.raises(NonFiniteError, match=f"scores of {key[1]} units in layer {key[0]}"):
        prune_lowest_globally(anatomy, scores, 0.2)
    with pytest.raises(NonFiniteError, match="NaN or -inf"):
        keep_lowest(anatomy, scores, 0.2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu7"], "unknown device 'gpu7'"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--pad-to", "0"], "argument --pad-to: 0 is below the minimum of 1"),
        (["--recover-steps", "-1"], "argument --recover-steps: -1 is below the minimum of 0"),
        (["--seed", "x"], "argument --seed: 'x' is not a whole number"),
        (["-o", "=3"], "option '=3' must look like name=value"),
        (["--calibration", "file:/no/such.txt", "--recover-steps", "1"], "no such file"),
        (["--sparsity", "0.2,abc"], "must be numbers like 0.2,0.3,0.5"),
        (["--attn", "fast"], "unknown attention implementation 'fast'; choose one of eager"),
        (["--device", "meta"], "device 'meta' cannot run a model here"),
    ],
)
def test_more_bad_prune_inputs_fail_before_loading(folders, tmp_path, capsys, args, message):
    _, model_dir, _ = folders
    out = tmp_path / "out"
    base = ["prune", "--model", model_dir, "--method", "magnitude", "--out", out]
    code, err = gisp(capsys, *base, *(["--sparsity", "0.2"] if "--sparsity" not in args else []), *args)
    assert_clear_error(code, err, "prune", [message])
    assert not out.exists()


def test_unwritable_output_is_refused_before_loading(folders, tmp_path, capsys):
    _, model_dir, _ = folders
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err = gisp(capsys, "prune", "--model", model_dir, "--method", "magnitude", "--sparsity", "0.2", "--out", a_file / "out")
    line = assert_clear_error(code, err, "prune", [f"'{a_file / 'out'}' cannot be written"])
    assert "is not a folder" in line
    code, err = gisp(capsys, "eval", "--model", model_dir, "--json", tmp_path)
    assert_clear_error(code, err, "eval", [f"{tmp_path}' is a folder; give a file path"])


def test_a_folder_with_only_a_config_is_one_clear_line(folders, tmp_path, capsys):
    _, model_dir, _ = folders
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    code, err = gisp(capsys, "eval", "--model", tmp_path / "bad")
    assert_clear_error(code, err, "eval", [f"model folder '{tmp_path / 'bad'}'"])


def test_compare_with_an_empty_method_list_is_refused(folders, tmp_path, capsys):
    _, model_dir, _ = folders
    code, err = gisp(capsys, "compare", "--model", model_dir, "--methods", ",", "--out", tmp_path / "out")
    assert_clear_error(code, err, "compare", ["--methods names no method"])
    assert not (tmp_path / "out").exists()
