"""`gisp prune --quantize` and `gisp compare -q METHOD:QUANT` end to end on a tiny saved model."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from gisp_plugin.cli import main
from gisp_plugin.deploy.size import weights_bytes
from tests.tiny import random_ids, tiny_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    return tiny_folder(tmp_path_factory.mktemp("quantize"), "qwen2", tokenizer)


def test_prune_quantize_writes_a_quantised_folder_with_its_card(tmp_path, setup):
    model_dir, _ = setup
    args = ["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.3", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "int8"), "--quantize", "int8wo"]) == 0  # another run: its own folder
    plain, quantized = tmp_path / "plain" / "magnitude-s0.30", tmp_path / "int8" / "magnitude-s0.30-int8wo"
    record = json.loads((quantized / "pruning.json").read_text())
    assert record["info"]["quantization"]["config"] == "Int8WeightOnlyConfig" and record["info"]["pad_to"] == 1
    assert weights_bytes(quantized) < 0.8 * weights_bytes(plain)
    card = ModelCard.load(quantized / "README.md")
    assert {"torchao", "int8wo", "magnitude"} <= set(card.data.tags) and "Int8WeightOnlyConfig" in card.text
    ids = random_ids()
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(plain, trust_remote_code=True)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(quantized, trust_remote_code=True)(ids).logits
    assert (a - b).abs().max() / a.abs().max() < 0.025  # the tolerance of tests/deploy/test_quantize.py


def test_compare_adds_quantised_rows_with_sizes(tmp_path, setup):
    model_dir, text = setup
    out = tmp_path / "results"
    spec = f"perplexity:source=file:{text},seqlen=16,max_windows=4"
    args = ["compare", "--model", str(model_dir), "--methods", "magnitude", "--sparsity", "0.3", "--eval", spec]
    args += ["--calibration", f"file:{text}", "--n-samples", "4", "--seqlen", "16", "--out", str(out), "--save-models"]
    assert main([*args, "-q", "magnitude:int8wo", "-q", "dense:int8dq"]) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"dense", "dense+int8dq", "magnitude", "magnitude+int8wo"}
    for name in ("dense", "magnitude"):
        quantized = rows[f"{name}+int8dq" if name == "dense" else f"{name}+int8wo"]
        assert quantized["metrics"]["size_mib"] < 0.8 * rows[name]["metrics"]["size_mib"]
        assert quantized["metrics"]["bytes_per_param"] < rows[name]["metrics"]["bytes_per_param"]
    table = (out / "table.md").read_text()
    assert "## Size and quality" in table and "| magnitude+int8wo | 30% |" in table
    assert "| dense+int8dq |" in table.split("## Achieved sparsity")[0]
    card = ModelCard.load(out / "models" / "magnitude-s0.30-int8wo" / "README.md")
    assert "## Evaluation" in card.text and "size_mib" in card.text
    assert main([*args, "-q", "magnitude:fp8dq"]) == 2  # refused on CPU, before the model is loaded
