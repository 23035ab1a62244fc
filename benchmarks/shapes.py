"""Shapes of randomly initialised benchmark models (timing and memory only): Llamas and one Mixtral."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

SHAPES = {
    # SmolLM2-135M: 30 layers, 9 query / 3 key-value heads, hidden 576, MLP 1536
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    # a mid-size Llama-2-style model with GQA, small enough for CPU timing
    "mid-llama": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    # 0.33 B parameters: big enough that weights and gradient sums dominate a process (benchmarks/distributed.py)
    "fsdp-llama": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    # TinyLlama-1.1B: 22 layers, 32 query / 4 key-value heads, hidden 2048, MLP 5632
    "tinyllama": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
    ),
    # Llama-2-7B: 32 layers, 32 heads (plain multi-head attention), hidden 4096, MLP 11008
    "llama2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    # a small Mixtral: 8 routed experts of 1408 channels, top-2, GQA (the MoE row of compaction.py)
    "mid-mixtral": dict(
        model_type="mixtral",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
    ),
}


def random_model(shape: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of a named shape (a Llama unless it names another type), built
    directly on ``device`` in ``dtype``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, **fields, max_position_embeddings=4096, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: a 7B model in float32 would need 28 GB first
    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(default)
