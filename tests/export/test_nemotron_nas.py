"""Nemotron-NAS (DeciLM) folders, read by llama.cpp's own ``convert_hf_to_gguf.py`` and run by llama.cpp.

The converter is an independent reader of ``block_configs``: it derives each layer's key/value heads from
``n_heads_in_group`` and each MLP width from ``ffn_mult`` (rounded up to a multiple of 256), and takes a
byte-fallback BPE vocabulary for a model whose vocabulary is not Llama 3's, so the tiny model here has
head size x heads = hidden size, MLP widths up to 512 and that tokenizer. Its GGUF must run equal to the
transformers model (float32: 1e-5 on O(1) logits, see test_gguf_llama_cpp).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.saving import load_pruned, save_pruned
from gisp_plugin.export.nemotron_nas import FFN_MULTIPLE, ffn_mult
from gisp_plugin.export.run import export_folder
from tests.export import engines
from tests.tiny import random_ids, random_keep, record_for, tiny_model, tiny_spm_tokenizer

SHAPE = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 400}


@pytest.fixture(scope="module")
def converter(tmp_path_factory):
    return engines.extract_converter(tmp_path_factory.mktemp("llama.cpp"))


def _pruned(tmp_path, flap_biases: bool = False, family: str = "llama"):
    model = tiny_model(family, layers=4, **SHAPE, **({"head_dim": 16} if family == "mistral" else {}))
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, seed=2, p_keep=0.5, empty_layer=2, empty_kind="mlp_channel")
    keep[1, "attn_head"] = torch.zeros_like(keep[1, "attn_head"])  # an attention no_op
    extra = {"model.layers.3.mlp.down_proj": torch.randn(64, generator=torch.Generator().manual_seed(1))} if flap_biases else None
    compact = adapter.compact(model, keep, extra)
    folder = tmp_path / "pruned"
    save_pruned(compact, tiny_spm_tokenizer(), folder, record_for(compact, anatomy, keep))
    return folder


@pytest.mark.parametrize(
    ("family", "flap_biases"), [("llama", False), ("llama", True), ("mistral", False), ("qwen2", False), ("phi3", True)]
)
def test_llama_cpp_converter_reads_the_folder_and_runs_it_exactly(tmp_path, converter, family, flap_biases):
    folder = _pruned(tmp_path, flap_biases, family)
    out = tmp_path / "nas"
    report = export_folder(folder, "nemotron-nas", out)
    config = json.loads((out / "config.json").read_text())
    blocks = config["block_configs"]
    assert config["architectures"] == ["DeciLMForCausalLM"] and len(blocks) == 4
    assert blocks[1]["attention"]["no_op"] and not blocks[1]["ffn"]["no_op"]
    assert not blocks[2]["ffn"]["no_op"]  # attention then no MLP: kept as 256 zero channels for llama.cpp's graph
    assert config["mlp_bias"] is flap_biases and config["attention_bias"] is (family == "qwen2")
    assert report.executed_params > report.compacted_params
    converted = engines.convert(converter, out, tmp_path / "nas.gguf")
    assert converted.returncode == 0, converted.stderr[-2000:]
    ids = random_ids(1, 12)[0].tolist()
    with torch.no_grad():
        want = load_pruned(folder)(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(engines.logits(tmp_path / "nas.gguf", ids), want, rtol=0, atol=1e-5)


def test_config_class_gives_engines_block_attributes(tmp_path):
    folder = _pruned(tmp_path)
    export_folder(folder, "nemotron-nas", tmp_path / "nas")
    config = AutoConfig.from_pretrained(tmp_path / "nas", trust_remote_code=True)
    assert type(config).__name__ == "DeciLMConfig"
    block = config.block_configs[0]
    assert block.attention.n_heads_in_group * (config.num_attention_heads // block.attention.n_heads_in_group) == 4
    assert isinstance(block.ffn.ffn_mult, float) and block.attention.no_op is False


@pytest.mark.parametrize("width", [256, 512, 768, 2816, 14336])
@pytest.mark.parametrize("hidden", [64, 576, 4096, 5120])
def test_ffn_mult_round_trips_through_the_engines_formula(width, hidden):
    mult = ffn_mult(width, hidden)
    derived = int(2 * mult * hidden / 3)
    assert -(-derived // FFN_MULTIPLE) * FFN_MULTIPLE == width
