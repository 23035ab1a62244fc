"""``gisp plan``: inputs refused before any config is read, and counts against an independent count of the config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gisp_plugin.cli import main
from gisp_plugin.distributed.memory_model import GIB, plan_memory
from tests.tiny import tiny_config

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
LLAMA_8B = CONFIGS / "llama-3-8b.json"


def llama_counts(config: dict) -> tuple[int, int]:
    """Parameters and gradient-summed weights of a Llama config, counted by hand from its fields."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, k = heads * head_dim, kv * head_dim
    attention = hidden * q + 2 * hidden * k + q * hidden
    per_layer = attention + 3 * hidden * inter + 2 * hidden  # projections, MLP, two RMS norms
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
    params = embeddings + layers * per_layer + hidden  # + final norm
    # the engine sums q and o (and k, v without GQA: then every head owns its k/v rows) and the MLP
    summed_attention = 2 * hidden * q + (2 * hidden * k if kv == heads else 0)
    return params, layers * (summed_attention + 3 * hidden * inter)


def test_llama_3_8b_counts_and_bytes_per_rank():
    fields = json.loads(LLAMA_8B.read_text())
    params, summed = llama_counts(fields)
    assert params == 8_030_261_248  # the published parameter count of Llama-3-8B
    one = plan_memory(str(LLAMA_8B), 1, False, "bfloat16", 2, 256)
    assert (one.counts.params, one.counts.summed) == (params, summed)
    assert one.weights == 2 * params and one.gradient_sums == 4 * summed
    eight = plan_memory(str(LLAMA_8B), 8, True, "bfloat16", 2, 256)
    assert eight.weights == 2 * math.ceil(params / 8) and eight.gradient_sums == 4 * math.ceil(summed / 8)
    assert eight.device_total < 0.3 * one.device_total  # sharding is the point
    assert eight.device_total_checkpointed < eight.device_total
    assert 80 in eight.fits() and 24 not in one.fits()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_tiny_configs_count_like_the_hand_count(family, tmp_path):
    config = tiny_config(family)
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    plan = plan_memory(str(path), 1, False, "float32", 1, 8)
    params, summed = llama_counts(config.to_dict())
    norms = 2 * config.head_dim * config.num_hidden_layers if family == "qwen3" else 0  # per-head q_norm and k_norm
    assert plan.counts.params == params + norms
    assert plan.counts.summed == summed


def test_activations_grow_with_tokens_and_shrink_with_checkpointing():
    small = plan_memory(str(LLAMA_8B), 1, False, "bfloat16", 1, 128)
    large = plan_memory(str(LLAMA_8B), 1, False, "bfloat16", 2, 128)
    assert large.activations == 2 * small.activations
    assert large.activations_checkpointed < large.activations / 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nproc", "1", "--fsdp"], "--nproc 2 or more"),
        (["--cpu-offload"], "with --fsdp"),
        (["--method", "gsip"], "gsip"),
        (["--method", "magnitude"], "gradient scoring"),
        (["--dtype", "int3"], "unknown dtype 'int3'"),
    ],
)
def test_bad_inputs_fail_before_the_config_is_read(argv, message, capsys):
    code = main(["plan", "--model", "/no/such/config.json", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "/no/such" not in err  # refused before the model is looked at


def test_missing_config_and_zero_ranks_are_named(capsys, tmp_path):
    assert main(["plan", "--model", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["plan", "--model", str(LLAMA_8B), "--nproc", "0"]) == 2
    assert "below the minimum of 1" in capsys.readouterr().err


def test_cli_prints_a_table_and_json(capsys):
    assert main(["plan", "--model", str(LLAMA_8B), "--nproc", "8", "--fsdp"]) == 0
    table = capsys.readouterr().out
    assert "float32 gradient sums (shard)" in table and "fits on: " in table
    assert main(["plan", "--model", str(LLAMA_8B), "--nproc", "8", "--fsdp", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (
        plan["nproc"] == 8
        and plan["fsdp"]
        and plan["device_total"] / GIB == pytest.approx(plan_memory(str(LLAMA_8B), 8, True).device_total / GIB)
    )
