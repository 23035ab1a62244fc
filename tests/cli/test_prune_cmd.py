"""`gisp prune` and `gisp methods` end to end on a tiny saved model, and their errors."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_plugin.cli import main
from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.models.loading import load_model
from gisp_plugin.pruning import compact_subnetwork, run_method
from gisp_plugin.recovery.lora import RecoveryOptions, RecoveryReport, recover
from tests.tiny import SAMPLE_TEXT, random_ids, tiny_model


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("dense") / "tiny-mistral"
    tiny_model("mistral").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_methods_lists_plugin_version_and_description(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^magnitude\s+gisp_plugin\.methods\.magnitude\s+\d+\.\d+", out, re.M)
    assert "Global L2 norm" in out


def test_prune_writes_one_model_per_target_and_trajectory(tmp_path, dense_folder, capsys):
    out = tmp_path / "out"
    code = main(["prune", "--model", str(dense_folder), "--method", "magnitude", "--sparsity", "0.2,0.4", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "magnitude-s0.20",
        "magnitude-s0.40",
        "run.json",
        "trajectory.json",
    ]
    dense = AutoModelForCausalLM.from_pretrained(dense_folder)
    expected = list(run_method(dense, None, "magnitude", [0.2, 0.4]))
    ids = random_ids()
    for subnetwork in expected:
        folder = out / f"magnitude-s{subnetwork.target:.2f}"
        record = json.loads((folder / "pruning.json").read_text())
        assert record["method"] == "magnitude" and record["target"] == subnetwork.target
        assert abs(record["sparsity"] - subnetwork.target) < 0.02
        reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        with MaskedModel(dense, _anatomy(dense)) as masked, torch.no_grad():
            masked.apply(subnetwork.keep)
            torch.testing.assert_close(reloaded(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-5)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["target"] for line in lines] == [0.2, 0.4]


def _anatomy(model):
    from gisp_plugin.adapters.api import adapter_for

    return adapter_for(model).anatomy(model)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "gsip", "--sparsity", "0.2"], "unknown method 'gsip'; available:"),
        (["--method", "magnitude", "--sparsity", "1.5"], "outside (0, 1)"),
        (["--method", "magnitude", "--sparsity", "0.9995"], "above what the prunable layers can give"),
        (["--method", "magnitude", "--sparsity", "0.2", "-o", "steps=2"], "unknown option 'steps'"),
        (["--method", "magnitude", "--sparsity", "0.2", "--model", "/no/such/folder"], "no model folder"),
        (["--method", "magnitude", "--sparsity", "0.2", "--model", "meta-llama/Llama-2-7b-hf"], "Hugging Face Hub"),
    ],
)
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, dense_folder, capsys, args, message):
    out = tmp_path / "out"
    full = ["prune", "--model", str(dense_folder), "--out", str(out), *args]
    assert main(full) == 2
    err = capsys.readouterr().err
    assert message in err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [
        f"gisp prune: error: {err.split('error: ')[1].strip()}"
    ]
    assert "Traceback" not in err
    assert not out.exists()


def test_recovery_after_pruning_is_recorded_and_reloads(tmp_path, dense_folder):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 30)
    out = tmp_path / "out"
    args = ["prune", "--model", str(dense_folder), "--method", "magnitude", "--sparsity", "0.3", "--out", str(out)]
    assert main([*args, "--recover-steps", "3", "--calibration", f"file:{text}", "--n-samples", "8", "--seqlen", "16"]) == 0
    folder = out / "magnitude-s0.30"
    recovery = json.loads((folder / "pruning.json").read_text())["info"]["recovery"]
    assert recovery["steps"] == 3 and len(recovery["losses"]) == 3
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    # the recovered model, made again in memory from the same seed and data (CPU float32 is deterministic)
    model, tokenizer = load_model(str(dense_folder))
    subnetwork = next(run_method(model, tokenizer, "magnitude", [0.3]))
    recovered, _ = compact_subnetwork(model, subnetwork, 1)
    dense_logits = recovered(random_ids()).logits.detach()  # the same weights before recovery
    data = load_calibration(CalibrationRequest(f"file:{text}", 8, 16, seed=0), tokenizer)
    recover(recovered, tokenizer, data, RecoveryOptions(steps=3, seed=0), RecoveryReport())
    ids = random_ids()
    with torch.no_grad():
        expected, got = recovered.eval()(ids).logits, reloaded(ids).logits
    assert not torch.allclose(expected, dense_logits, atol=1e-3)  # recovery changed the model ...
    # ... and the folder holds it: merged LoRA weights saved in float32 and read back unchanged; the only
    # difference is the order of float32 sums between the merged and the reloaded module (~1e-6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_recovery_without_data_for_a_data_free_method_is_refused(tmp_path, dense_folder, capsys):
    args = ["prune", "--model", str(dense_folder), "--method", "magnitude", "--sparsity", "0.3", "--out", str(tmp_path / "o")]
    assert main([*args, "--recover-steps", "3"]) == 2
    assert "give --calibration SOURCE for --recover-steps" in capsys.readouterr().err
