"""Tiny random models and a tiny offline tokenizer for tests (built from configs, no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB = 320
SAMPLE_TEXT = (
    "Structured pruning removes whole attention heads and MLP channels from a language model. "
    "The pruned model is really smaller and faster, and it should keep most of its quality. "
    "Calibration text drives the importance scores; evaluation text must be held apart. "
)

# Each family as its published checkpoints configure it: the field names of a real config.json (named in
# the comment), with sizes shrunk. Where a checkpoint sets no head_dim, none is set here either; tied
# embeddings and sliding-window fields are as published. Sizes: hidden 48, 32 MLP channels, vocab 320.
FAMILIES = {
    # meta-llama/Llama-2-7b-hf: multi-head attention, no head_dim (48 / 6 = 8)
    "llama": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # mistralai/Mistral-Nemo-Base-2407: GQA, head_dim set and != hidden / heads (8 * 8 = 64 != 48)
    "mistral": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "head_dim": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": 16,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # Qwen/Qwen2.5-0.5B: q/k/v biases, GQA, tied embeddings, sliding-window fields present but off, no head_dim
    "qwen2": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": 24,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
    },
    # Qwen/Qwen3-0.6B: per-head q_norm/k_norm, head_dim 16 != 48 / 4, tied embeddings
    "qwen3": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": 16,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": 28,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "use_cache": True,
        "use_sliding_window": False,
    },
    # google/gemma-2b: multi-query attention (one kv head), head_dim set (8 heads * 6 = 48, as 8 * 256 = 2048
    # there), the legacy hidden_act "gelu" (transformers reads it as the tanh approximation), embeddings tied
    # (GemmaConfig's default; the checkpoint sets no tie_word_embeddings)
    "gemma": {
        "model_type": "gemma",
        "architectures": ["GemmaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": 6,
        "hidden_act": "gelu",
        "initializer_range": 0.02,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "use_cache": True,
    },
    # google/gemma-2-2b: soft-capping, query_pre_attn_scalar, alternating sliding/global layers, extra norms
    "gemma2": {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "cache_implementation": "hybrid",
        "final_logit_softcapping": 30.0,
        "head_dim": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 8,
        "use_cache": True,
    },
    # google/gemma-3-1b-it (text): q_norm/k_norm, one kv head, local/global pattern with its own rope base
    "gemma3": {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "cache_implementation": "hybrid",
        "final_logit_softcapping": None,
        "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh",
        "initializer_range": 0.02,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "use_cache": True,
    },
    # microsoft/Phi-3-mini-4k-instruct: fused qkv_proj and gate_up_proj, multi-head attention, no head_dim
    "phi3": {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "original_max_position_embeddings": 128,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": 127,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # microsoft/Phi-4-mini-instruct: fused projections, GQA, partial rotary, tied embeddings
    "phi4mini": {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "embd_pdrop": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "original_max_position_embeddings": 128,
        "partial_rotary_factor": 0.75,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": True,
        "use_cache": True,
    },
    # mistralai/Mixtral-8x7B-v0.1: 8 routed experts, top-2, renormalised router weights (4 experts here)
    "mixtral": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_experts_per_tok": 2,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # Qwen/Qwen1.5-MoE-A2.7B: 60 routed experts (top-4, not renormalised) plus a gated shared expert
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        "architectures": ["Qwen2MoeForCausalLM"],
        "attention_dropout": 0.0,
        "decoder_sparse_step": 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": 21,
        "moe_intermediate_size": 16,
        "norm_topk_prob": False,
        "num_attention_heads": 6,
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "num_key_value_heads": 6,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 24,
        "sliding_window": 32,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
    },
    # Qwen/Qwen3-30B-A3B: 128 routed experts (top-8, renormalised), q_norm/k_norm, head_dim 16 != 48 / 4
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "decoder_sparse_step": 1,
        "head_dim": 16,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": 48,
        "mlp_only_layers": [],
        "moe_intermediate_size": 16,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts": 5,
        "num_experts_per_tok": 2,
        "num_key_value_heads": 2,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
    },
    # allenai/OLMoE-1B-7B-0924: 64 experts (top-8, not renormalised); q/k norms over the whole projection
    "olmoe": {
        "model_type": "olmoe",
        "architectures": ["OlmoeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "norm_topk_prob": False,
        "num_attention_heads": 6,
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "num_key_value_heads": 6,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False,
    },
    # Families no adapter declares: their anatomy is derived from their modules (gisp_plugin.adapters.derived).
    # CohereForAI/c4ai-command-r-v01: LayerNorm without bias, parallel attention and MLP, logit scale
    "cohere": {
        "model_type": "cohere",
        "architectures": ["CohereForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "logit_scale": 0.0625,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "rope_theta": 8000000.0,
        "use_cache": True,
        "use_qk_norm": False,
    },
    # stabilityai/stablelm-2-1_6b: q/k/v biases, partial rotary (a quarter of each head), LayerNorm with bias
    "stablelm": {
        "model_type": "stablelm",
        "architectures": ["StableLmForCausalLM"],
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_dropout": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "partial_rotary_factor": 0.25,
        "qk_layernorm": False,
        "rope_theta": 10000,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_parallel_residual": False,
        "use_qkv_bias": True,
    },
    # kyutai/helium-1-preview-2b: head_dim set, multi-head attention
    "helium": {
        "model_type": "helium",
        "architectures": ["HeliumForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mlp_bias": False,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "rms_norm_eps": 1e-08,
        "rope_theta": 100000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # ibm-granite/granite-3.0-2b-base: embedding, residual, attention and logit multipliers, GQA, tied embeddings
    "granite": {
        "model_type": "granite",
        "architectures": ["GraniteForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_multiplier": 0.015625,
        "embedding_multiplier": 12.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "logits_scaling": 8.0,
        "mlp_bias": False,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "residual_multiplier": 0.22,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "use_cache": True,
    },
    # allenai/OLMo-1B-hf: LayerNorm without parameters, tied embeddings
    "olmo": {
        "model_type": "olmo",
        "architectures": ["OlmoForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "use_cache": True,
    },
    # allenai/OLMo-2-1124-7B: q/k norms over the whole projection (cut with the heads), norms after the blocks
    "olmo2": {
        "model_type": "olmo2",
        "architectures": ["Olmo2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "rms_norm_eps": 1e-06,
        "rope_theta": 500000,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # THUDM/glm-4-9b-chat-hf: fused gate_up_proj, q/k/v biases, GQA, partial rotary
    "glm": {
        "model_type": "glm",
        "architectures": ["GlmForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "head_dim": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1.5625e-07,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # bigcode/starcoder2-3b: plain MLP c_fc/c_proj with biases, biases everywhere, GQA, sliding window
    "starcoder2": {
        "model_type": "starcoder2",
        "architectures": ["Starcoder2ForCausalLM"],
        "attention_dropout": 0.1,
        "embedding_dropout": 0.1,
        "hidden_act": "gelu_pytorch_tanh",
        "initializer_range": 0.018042,
        "norm_epsilon": 1e-05,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "residual_dropout": 0.1,
        "rope_theta": 999999.4420358813,
        "sliding_window": 16,
        "use_bias": True,
        "use_cache": True,
    },
    # nvidia/Minitron-4B-Base: plain ReLU-squared MLP up_proj/down_proj, LayerNorm1P, partial rotary, GQA
    "nemotron": {
        "model_type": "nemotron",
        "architectures": ["NemotronForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": 8,
        "hidden_act": "relu2",
        "initializer_range": 0.0134,
        "mlp_bias": False,
        "norm_eps": 1e-05,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # LGAI-EXAONE/EXAONE-4.0-32B: per-head q/k norms, norms after the blocks (no pre-norms), GQA, three local
    # layers then a global one (published as "LLLG" with the 64 layer_types listed; 4 means the same here)
    "exaone4": {
        "model_type": "exaone4",
        "architectures": ["Exaone4ForCausalLM"],
        "attention_dropout": 0.0,
        "head_dim": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000,
        "sliding_window": 8,
        "sliding_window_pattern": 4,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # ByteDance-Seed/Seed-OSS-36B-Base: q/k/v biases, no output bias, GQA
    "seed_oss": {
        "model_type": "seed_oss",
        "architectures": ["SeedOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.1,
        "attention_out_bias": False,
        "head_dim": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "mlp_bias": False,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "residual_dropout": 0.1,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # arcee-ai/AFM-4.5B: plain ReLU-squared MLP up_proj/down_proj, GQA
    "arcee": {
        "model_type": "arcee",
        "architectures": ["ArceeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "relu2",
        "initializer_range": 0.02,
        "mlp_bias": False,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # swiss-ai/Apertus-8B-2509: plain MLP with the learned xIELU activation, per-head q/k norms, GQA
    "apertus": {
        "model_type": "apertus",
        "architectures": ["ApertusForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_act": "xielu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 12000000,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # tencent/Hunyuan-7B-Instruct: per-head query/key norms, GQA, head_dim set
    "hunyuan_v1_dense": {
        "model_type": "hunyuan_v1_dense",
        "architectures": ["HunYuanDenseV1ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "use_cache": True,
    },
    # baidu/ERNIE-4.5-0.3B-PT: GQA, head_dim set, tied embeddings
    "ernie4_5": {
        "model_type": "ernie4_5",
        "architectures": ["Ernie4_5ForCausalLM"],
        "head_dim": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000,
        "tie_word_embeddings": True,
        "use_bias": False,
        "use_cache": True,
    },
}
# Derived mixture-of-experts families whose routers hold more than a weight: a score-correction bias per expert
# (a buffer on the router, a parameter of a module inside it, a buffer on the block around it), a sparse-mixer
# rule, a weight inside a linear of the router. Kept apart from FAMILIES: their first layers are dense by a config
# field (``first_k_dense_replace``, ``moe_layer_start_index``) that layer removal does not rewrite yet.
ROUTER_FAMILIES = {
    # zai-org/GLM-4.5-Air: sigmoid router with e_score_correction_bias [E] (a buffer), a shared expert, layer 0 dense
    "glm4_moe": {
        "model_type": "glm4_moe",
        "architectures": ["Glm4MoeForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "first_k_dense_replace": 1,
        "head_dim": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "moe_intermediate_size": 16,
        "n_group": 1,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 6,
        "num_experts_per_tok": 2,
        "num_key_value_heads": 2,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000,
        "routed_scaling_factor": 1.0,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "use_cache": True,
        "use_qk_norm": False,
    },
    # microsoft/Phi-3.5-MoE-instruct: sparse-mixer routing (top-2 by a threshold rule), LayerNorms, biases (its
    # longrope rope_scaling is left out: its factor lists are sized to the published head_dim)
    "phimoe": {
        "model_type": "phimoe",
        "architectures": ["PhiMoEForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "input_jitter_noise": 0.01,
        "lm_head_bias": True,
        "num_attention_heads": 6,
        "num_experts_per_tok": 2,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.01,
        "sliding_window": 128,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # baidu/ERNIE-4.5-21B-A3B-PT: moe_statics.e_score_correction_bias [1, E] (a parameter inside the router),
    # shared experts, layer 0 dense, tied embeddings
    "ernie4_5_moe": {
        "model_type": "ernie4_5_moe",
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "hidden_act": "silu",
        "moe_intermediate_size": 16,
        "moe_k": 2,
        "moe_layer_interval": 1,
        "moe_layer_start_index": 1,
        "moe_num_experts": 4,
        "moe_num_shared_experts": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000,
        "tie_word_embeddings": True,
        "use_bias": False,
        "use_cache": True,
    },
    # MiniMaxAI/MiniMax-M2: sigmoid router, its e_score_correction_bias [E] a buffer of the block passed to the router,
    # q/k norms over the whole projections with grouped key/value heads, partial rotary (rotary_dim)
    "minimax_m2": {
        "model_type": "minimax_m2",
        "architectures": ["MiniMaxM2ForCausalLM"],
        "attention_dropout": 0.0,
        "head_dim": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_attention_heads": 6,
        "num_experts_per_tok": 2,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 5000000,
        "rotary_dim": 4,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_qk_norm": True,
        "use_routing_bias": True,
    },
    # tencent/Hunyuan-A13B-Instruct: the router's weight inside a linear gate.wg, a shared_mlp, per-head q/k norms
    "hunyuan_v1_moe": {
        "model_type": "hunyuan_v1_moe",
        "architectures": ["HunYuanMoEV1ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "moe_topk": 2,
        "num_attention_heads": 6,
        "num_experts": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
}
# Hybrids pruned in part: their MLPs and experts only (their linear-attention and attention layers kept whole)
HYBRID_FAMILIES = {
    # Qwen/Qwen3-Next-80B-A3B-Instruct: three gated-delta-net (linear attention) layers then one gated full attention,
    # routed experts plus a gated shared expert in every layer
    "qwen3_next": {
        "model_type": "qwen3_next",
        "architectures": ["Qwen3NextForCausalLM"],
        "decoder_sparse_step": 1,
        "full_attention_interval": 4,
        "head_dim": 8,
        "hidden_act": "silu",
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 8,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_value_head_dim": 8,
        "mlp_only_layers": [],
        "moe_intermediate_size": 16,
        "norm_topk_prob": True,
        "num_attention_heads": 6,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "num_key_value_heads": 2,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000000,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 16,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
    # tiiuae/Falcon-H1-0.5B-Base: a state-space mixer (mamba) beside the attention in every layer, muP multipliers,
    # the mixer's mup_vector a non-persistent buffer the model computes at init (sizes shrunk; multipliers as published)
    "falcon_h1": {
        "model_type": "falcon_h1",
        "architectures": ["FalconH1ForCausalLM"],
        "attention_in_multiplier": 1.0,
        "attention_out_multiplier": 0.9375,
        "embedding_multiplier": 5.656854249492381,
        "head_dim": 8,
        "hidden_act": "silu",
        "key_multiplier": 0.390625,
        "lm_head_multiplier": 0.0390625,
        "mamba_chunk_size": 16,
        "mamba_conv_bias": True,
        "mamba_d_conv": 4,
        "mamba_d_head": 8,
        "mamba_d_ssm": 48,
        "mamba_d_state": 8,
        "mamba_expand": 2,
        "mamba_n_groups": 1,
        "mamba_n_heads": 6,
        "mamba_norm_before_gate": False,
        "mamba_proj_bias": False,
        "mamba_rms_norm": False,
        "mlp_multipliers": [0.8838834764831844, 0.5859375],
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "projectors_bias": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000000000.0,
        "ssm_in_multiplier": 1.25,
        "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
        "ssm_out_multiplier": 0.23570226039551587,
        "tie_word_embeddings": False,
        "use_cache": True,
    },
}
MOE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}
# Families whose adapter is derived from their modules, not declared (tests/families/test_derived.py)
DERIVED_FAMILIES = [
    "cohere",
    "stablelm",
    "helium",
    "granite",
    "olmo",
    "olmo2",
    "glm",
    "starcoder2",
    "nemotron",
    "exaone4",
    "seed_oss",
    "arcee",
    "apertus",
    "hunyuan_v1_dense",
    "ernie4_5",
]
# Families with separate q/k/v and gate/up projections and a dense MLP in every layer: the hand-written
# independent computations of the method tests slice these tensors directly.
SEPARATE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
SIZES = {"hidden_size": 48, "intermediate_size": 32, "vocab_size": VOCAB, "max_position_embeddings": 128}
TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
# Gemma 2 soft-caps attention logits, which SDPA cannot do: transformers refuses SDPA for it.
EAGER_ONLY = {"gemma2"}


def with_attention(families) -> list[tuple[str, str]]:
    """(family, attention) cases: eager for every family, SDPA where transformers has it (none is a skip)."""
    return [(family, attn) for family in families for attn in ("eager", "sdpa") if attn == "eager" or family not in EAGER_ONLY]


def tiny_config(family: str = "llama", layers: int = 3, attn: str = "eager", **overrides):
    """The config of a tiny ``family`` model, built the way transformers reads a published config.json."""
    published = {**FAMILIES, **ROUTER_FAMILIES, **HYBRID_FAMILIES}[family]
    fields = {**published, **SIZES, **TOKENS, "num_hidden_layers": layers, **overrides}
    config = CONFIG_MAPPING[fields["model_type"]].from_dict(fields)
    config._attn_implementation = attn
    return config


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 3, attn: str = "eager", **overrides):
    """A random tiny model of a family as published (see ``FAMILIES``), with non-trivial norms and biases."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, attn, **overrides)).eval()
    with torch.no_grad():  # random init keeps norms at 1 and biases at 0: make them non-trivial
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with VOCAB tokens, trained offline on SAMPLE_TEXT."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def tiny_spm_tokenizer(vocab: int = 400) -> PreTrainedTokenizerFast:
    """A byte-fallback BPE tokenizer in the Llama 2 / Mistral layout (metaspace, ``<0xNN>`` byte tokens), trained
    offline on SAMPLE_TEXT: the layout llama.cpp's converter reads for a DeciLM vocabulary that is not Llama 3's."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def tiny_folder(root, family: str, tokenizer) -> tuple:
    """A saved tiny ``family`` model with ``tokenizer`` in ``root/tiny-FAMILY``, and a text file of
    SAMPLE_TEXT repeated: what a comparison config needs for its model and its data."""
    model_dir = root / f"tiny-{family}"
    tiny_model(family).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT * 40)
    return model_dir, text


def random_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def random_keep(
    anatomy, seed: int, p_keep: float, empty_layer: int | None = None, empty_kind: str = "attn_head", p_expert_out: float = 0.0
):
    """A random KeepMask (each unit kept with probability ``p_keep``), optionally emptying one block.

    In mixture-of-experts layers each routed expert also loses all its channels with probability
    ``p_expert_out`` (whole experts removed); a layer whose block ``empty_kind`` does not exist is left alone.
    """
    from gisp_plugin.anatomy.structures import KeepMask

    generator = torch.Generator().manual_seed(seed)
    keep = KeepMask.dense(anatomy)
    for key in keep.flags:
        flags = torch.rand(keep[key].shape, generator=generator) < p_keep
        rows = anatomy.kind(*key).router_rows
        if rows is not None:
            for readers in rows.readers:
                if float(torch.rand(1, generator=generator)) < p_expert_out:
                    flags[list(readers)] = False
        keep[key] = flags
    if empty_layer is not None and (empty_layer, empty_kind) in keep.flags:
        keep[empty_layer, empty_kind] = torch.zeros_like(keep[empty_layer, empty_kind])
    return keep


def record_for(compact, anatomy, keep, target: float = 0.3):
    """A minimal PruningRecord for a compacted tiny model (tests of saving and loading)."""
    from gisp_plugin.checkpoint.saving import PruningRecord, count_params

    return PruningRecord(
        base_model="tiny",
        method="test",
        options={},
        target=target,
        sparsity=anatomy.sparsity(keep),
        params=count_params(compact),
        layers=compact.config.pruned_layers,
        pruned_structures=keep.to_json(),
    )
