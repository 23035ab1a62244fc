"""torchao quantisation of tiny pruned models: exact reloads, bounded error, smaller folders, clear refusals."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import gisp_plugin
from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.saving import save_pruned
from gisp_plugin.cli import main
from gisp_plugin.deploy.padding import GPU_PAD_TO, default_pad_to
from gisp_plugin.deploy.quantize import (
    QuantizationError,
    check_quantization,
    parse_quantization,
    parse_row_quantizations,
    quantization_info,
    quantize_model,
    quantized_copy,
)
from gisp_plugin.deploy.size import serialized_bytes, weights_bytes
from tests.tiny import random_ids, random_keep, record_for, tiny_model

CPU_CHOICES = ["int8wo", "int8dq"]
# llama: plain projections; mistral: uneven GQA, so k/v are GatheredLinear; phi3: fused qkv and gate_up.
FAMILIES = ["llama", "mistral", "phi3"]
# Largest logit change from quantising the decoder's linear layers, relative to the largest logit of the
# unquantised model. Measured: 0.6-1.2% on these tiny random models (int8 rounding of weights, and of
# activations for int8dq); 2.5% leaves about twice that margin.
LOGIT_TOLERANCE = 0.025


def _pruned(family: str, seed: int = 0, pad_to: int = 1, **overrides):
    model = tiny_model(family, **overrides)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, seed, 0.6, empty_layer=1)  # one block loses all heads: zero-size projections stay plain
    compact = adapter.compact(model, keep, {}, pad_to)
    return compact, record_for(compact, anatomy, keep)


def _save_quantized(tmp_path, tokenizer, family: str, quant: str):
    compact, record = _pruned(family)
    choice = check_quantization(quant, "cpu", "float32")
    quantized = quantized_copy(compact, choice)
    record.info["quantization"] = quantization_info(choice)
    folder = save_pruned(quantized, tokenizer, tmp_path / "m", record)
    return compact, quantized, folder


@pytest.mark.parametrize("quant", CPU_CHOICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_folder_reloads_exactly_and_stays_close(tmp_path, tokenizer, family, quant):
    """Reloaded with load_pruned and with plain transformers: the same int8 tensors and bit-identical logits
    (same attention implementation); logits within LOGIT_TOLERANCE of the unquantised compacted model."""
    compact, quantized, folder = _save_quantized(tmp_path, tokenizer, family, quant)
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")), "safetensors only, no pickle"
    ids = random_ids()
    ours = gisp_plugin.load_pruned(folder, attn_implementation="eager")
    plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    with torch.no_grad():
        expected = quantized(ids).logits
        assert torch.equal(ours(ids).logits, expected)
        assert torch.equal(plain(ids).logits, expected)
        reference = compact(ids).logits
    error = (expected - reference).abs().max() / reference.abs().max()
    assert 0 < error < LOGIT_TOLERANCE, f"relative logit error {error:.4f}"

    saved = quantized.state_dict()
    for reloaded in (ours, plain):
        state = reloaded.state_dict()
        assert set(state) == set(saved)
        for name, tensor in saved.items():
            if hasattr(tensor, "qdata"):  # a torchao Int8Tensor: compare its int8 data and its scales
                assert type(state[name]) is type(tensor), name
                assert torch.equal(state[name].qdata, tensor.qdata) and torch.equal(state[name].scale, tensor.scale), name
            else:
                assert torch.equal(state[name], tensor), name
    quantized_names = [n for n, m in plain.model.layers.named_modules() if hasattr(getattr(m, "weight", None), "qdata")]
    assert quantized_names, "the reloaded model holds torchao tensors"
    assert not hasattr(plain.lm_head.weight, "qdata"), "the LM head stays unquantised"


@pytest.mark.parametrize("quant", CPU_CHOICES)
def test_quantized_folder_is_smaller_by_the_expected_factor(tmp_path, tokenizer, quant):
    """int8 weights: 1 byte per decoder linear weight plus a 4-byte scale and a 1-byte zero point per output
    row, every other tensor at 4 bytes; the folder holds that and at most a safetensors header more."""
    compact, record = _pruned("llama", intermediate_size=256)
    plain_folder = save_pruned(compact, tokenizer, tmp_path / "plain", record)
    quantized = quantized_copy(compact, parse_quantization(quant))
    folder = save_pruned(quantized, tokenizer, tmp_path / "q", record)

    linears = [m for m in compact.model.layers.modules() if isinstance(m, nn.Linear) and m.weight.numel()]
    int8_weights = sum(m.weight.numel() for m in linears)
    rows = sum(m.out_features for m in linears)
    params = sum(p.numel() for p in compact.parameters())
    expected = int8_weights + 5 * rows + 4 * (params - int8_weights)
    header = 32 * 1024  # names, shapes and torchao's metadata
    assert expected <= weights_bytes(folder) <= expected + header
    assert 4 * params <= weights_bytes(plain_folder) <= 4 * params + header
    assert int8_weights / params > 0.5, "most weights are decoder linear weights, so the factor means something"
    expected_factor = 4 * params / expected  # 1.96-2.0x here: embeddings and LM head keep 4 bytes per parameter
    factor = weights_bytes(plain_folder) / weights_bytes(folder)
    assert 0.9 * expected_factor <= factor <= expected_factor * 1.05, f"{factor:.2f}x smaller, expected {expected_factor:.2f}x"


@pytest.mark.parametrize("quant", CPU_CHOICES)
def test_padding_keeps_outputs_identical_before_and_after_quantisation(quant):
    """Zero MLP channels are inert: padded and unpadded compacted models agree, and still do once quantised
    (a zero column leaves a row's int8 scale alone; a zero row quantises to zeros)."""
    unpadded, _ = _pruned("qwen2", pad_to=1)
    padded, _ = _pruned("qwen2", pad_to=GPU_PAD_TO)
    widths = [layer.mlp.down_proj.in_features for layer in padded.model.layers]
    assert all(w % GPU_PAD_TO == 0 for w in widths) and widths != [
        layer.mlp.down_proj.in_features for layer in unpadded.model.layers
    ]
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(padded(ids).logits, unpadded(ids).logits, rtol=1e-5, atol=1e-6)
        choice = parse_quantization(quant)
        quantize_model(padded, choice)
        quantize_model(unpadded, choice)
        torch.testing.assert_close(padded(ids).logits, unpadded(ids).logits, rtol=1e-5, atol=1e-6)


def test_padding_default_depends_on_the_device():
    assert default_pad_to("cuda") == default_pad_to("cuda:1") == GPU_PAD_TO
    assert default_pad_to("cpu") == 1
    assert default_pad_to("cuda", 1) == 1 and default_pad_to("cpu", 128) == 128
    with pytest.raises(ValueError, match="--pad-to 0"):
        default_pad_to("cpu", 0)


@pytest.mark.parametrize("quant", ["fp8dq", "int4wo", "int4wo:group_size=32"])
def test_a_choice_the_cpu_cannot_run_names_what_it_can(quant):
    with pytest.raises(QuantizationError, match=r"cannot run on cpu .*this device runs: int8wo, int8dq"):
        check_quantization(quant, "cpu", "float32")


def test_bad_choices_name_the_valid_ones():
    with pytest.raises(QuantizationError, match="unknown quantisation 'int3'; choose one of int8wo, int8dq, int4wo, fp8dq"):
        parse_quantization("int3")
    with pytest.raises(QuantizationError, match="group_size '7' must be one of 32, 64, 128, 256"):
        parse_quantization("int4wo:group_size=7")
    with pytest.raises(QuantizationError, match="only int4wo takes group_size"):
        parse_quantization("int8wo:group_size=32")
    assert parse_quantization("int4wo").group_size == 64 and parse_quantization("int4wo:group_size=32").slug == "int4wo-g32"
    rows = parse_row_quantizations(["gisp:int8wo", "dense:int8dq", "gisp:int8wo"], ["gisp"], "cpu", "float32")
    assert {m: [c.label for c in cs] for m, cs in rows.items()} == {"gisp": ["int8wo"], "dense": ["int8dq"]}
    with pytest.raises(QuantizationError, match="names method 'flap', which is not compared; choose dense or one of gisp"):
        parse_row_quantizations(["flap:int8wo"], ["gisp"], "cpu", "float32")
    with pytest.raises(QuantizationError, match="must be METHOD:QUANT"):
        parse_row_quantizations(["int8wo"], ["gisp"], "cpu", "float32")


def test_prune_refuses_fp8_on_cpu_before_loading_the_model(tmp_path, capsys):
    """The model folder does not exist: the quantisation error comes first, so nothing was loaded."""
    code = main(
        ["prune", "--model", str(tmp_path / "missing"), "--method", "magnitude", "--sparsity", "0.3"]
        + ["--out", str(tmp_path / "out"), "--device", "cpu", "--quantize", "fp8dq"]
    )
    assert code == 2
    assert "quantisation 'fp8dq' cannot run on cpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant", [None, *CPU_CHOICES])
def test_serialized_bytes_counts_what_the_folder_holds(tmp_path, tokenizer, quant):
    """The in-memory count (used by compare and eval) matches the saved weights up to the safetensors header."""
    compact, record = _pruned("qwen2")  # tied embeddings: counted once, as saved
    model = quantized_copy(compact, parse_quantization(quant)) if quant else compact
    folder = save_pruned(model, tokenizer, tmp_path / "m", record)
    assert 0 < weights_bytes(folder) - serialized_bytes(model) <= 32 * 1024
