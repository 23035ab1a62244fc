"""Built-in adapter plugin for the Llama-like decoder families: one declaration of names per family.

Everything a method, the masks and compaction need follows from the declaration and the live modules;
family quirks that do not change what a structure owns (Gemma's soft-capping, query scaling, scaled
embeddings and extra norms, Qwen3's and Gemma 3's per-head ``q_norm``/``k_norm``, sliding-window layer
patterns) stay inside the family's own transformers modules, which the pruned model reuses.
"""

from __future__ import annotations

from gisp_plugin.adapters.adapter import ArchitectureAdapter, decoder_adapter
from gisp_plugin.anatomy.decoder import AttentionNames, DecoderDeclaration, ExpertNames, MLPNames
from gisp_plugin.plugins import hookimpl

SEPARATE = DecoderDeclaration()
FUSED = DecoderDeclaration(AttentionNames(qkv="qkv_proj"), MLPNames(gate_up="gate_up_proj"))
# Qwen-MoE configs place routed experts by layer index; Mixtral and OLMoE configs have neither field
QWEN_EXPERT_LAYERS = {"dense_layers_field": "mlp_only_layers", "sparse_step_field": "decoder_sparse_step"}
ROUTED = DecoderDeclaration(experts=ExpertNames(**QWEN_EXPERT_LAYERS))
ROUTED_SHARED = DecoderDeclaration(experts=ExpertNames(shared="shared_expert", **QWEN_EXPERT_LAYERS))
ROUTED_NORMED = DecoderDeclaration(AttentionNames(projection_norms=("q_norm", "k_norm")), experts=ExpertNames())


ADAPTERS = [
    decoder_adapter(
        "llama", "Llama 2/3 (MHA or GQA, optional attention/MLP biases): query heads and MLP channels", ("llama",), SEPARATE
    ),
    decoder_adapter("mistral", "Mistral (GQA, sliding window): query heads and MLP channels", ("mistral",), SEPARATE),
    decoder_adapter("qwen2", "Qwen2 / Qwen2.5 (q/k/v biases, GQA, tied or untied embeddings)", ("qwen2",), SEPARATE),
    decoder_adapter("qwen3", "Qwen3 (per-head q_norm/k_norm kept whole, GQA)", ("qwen3",), SEPARATE),
    decoder_adapter(
        "gemma",
        "Gemma 1/2/3 text (head_dim 256, soft-capping, query scaling, sliding/global layers, extra norms)",
        ("gemma", "gemma2", "gemma3_text"),
        SEPARATE,
    ),
    decoder_adapter("phi3", "Phi-3 / Phi-3.5 / Phi-4-mini (fused qkv_proj and gate_up_proj)", ("phi3",), FUSED),
    decoder_adapter(
        "moe",
        "Mixtral and Qwen3-MoE (routed experts: channels inside each expert; an expert goes with its last channel)",
        ("mixtral", "qwen3_moe"),
        ROUTED,
    ),
    decoder_adapter("qwen2_moe", "Qwen1.5/Qwen2-MoE (routed experts plus a gated shared expert)", ("qwen2_moe",), ROUTED_SHARED),
    decoder_adapter(
        "olmoe", "OLMoE (routed experts; q/k norms over the whole projection, cut with the heads)", ("olmoe",), ROUTED_NORMED
    ),
]


@hookimpl
def gisp_adapters() -> list[ArchitectureAdapter]:
    return ADAPTERS
