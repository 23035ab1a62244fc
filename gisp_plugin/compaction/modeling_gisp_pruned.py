"""Hugging Face modelling code for structurally pruned Llama-family models.

This file is copied next to every saved pruned model so that it loads with plain
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``: it depends only on torch and
transformers. Each decoder layer may keep a different number of query heads, key/value heads and MLP
channels (``config.pruned_layers``); query heads may be spread unevenly over key/value heads
(``kv_map``), which the stock ``repeat_kv`` cannot express. A layer with no heads (or no channels)
contributes only its output bias, if it has one.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM


def _even_groups(kv_map: list[int], num_kv_heads: int) -> int:
    """The group size when query heads split into equal contiguous groups per kv head, else 0."""
    if num_kv_heads == 0 or len(kv_map) % num_kv_heads:
        return 0
    group = len(kv_map) // num_kv_heads
    return group if kv_map == [i // group for i in range(len(kv_map))] else 0


def _sliding_window(config, layer_idx: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


class PrunedAttention(nn.Module):
    """Attention with any number of query heads, each mapped to one of the remaining kv heads."""

    def __init__(self, config, layer_idx: int, spec: dict):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.num_heads = spec["num_heads"]
        self.num_kv_heads = spec["num_kv_heads"]
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = _sliding_window(config, layer_idx)
        group = _even_groups(spec["kv_map"], self.num_kv_heads)
        # Equal contiguous groups use the stock GQA path; otherwise kv heads are gathered per query head.
        self.num_key_value_groups = group or 1
        self.kv_map = list(spec["kv_map"])
        self.gather_kv = group == 0 and self.num_heads > 0
        self._kv_index: dict[torch.device, torch.Tensor] = {}

        d, h = self.head_dim, self.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=spec["qkv_bias"])
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=spec["qkv_bias"])
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=spec["qkv_bias"])
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=spec["o_bias"])

    def _kv_index_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._kv_index:
            self._kv_index[device] = torch.tensor(self.kv_map, dtype=torch.long, device=device)
        return self._kv_index[device]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        batch, seq = input_shape

        if self.num_heads == 0:
            if cache is not None:  # keep the cache's sequence length right for the layers after this one
                empty = hidden_states.new_zeros(batch, 0, seq, self.head_dim)
                cache.update(empty, empty, self.layer_idx)
            return self.o_proj(hidden_states.new_zeros(*input_shape, 0)), None

        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if self.gather_kv:
            key = key.index_select(1, self._kv_index_on(key.device))
            value = value.index_select(1, self._kv_index_on(key.device))

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        output = output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(output), weights


class PrunedMLP(nn.Module):
    """Gated MLP with this layer's own number of channels (possibly zero) and optional output bias."""

    def __init__(self, config, spec: dict):
        super().__init__()
        h, channels = config.hidden_size, spec["intermediate_size"]
        self.gate_proj = nn.Linear(h, channels, bias=spec["mlp_bias"])
        self.up_proj = nn.Linear(h, channels, bias=spec["mlp_bias"])
        self.down_proj = nn.Linear(channels, h, bias=spec["down_bias"])
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def install_pruned_layers(model: nn.Module, config) -> None:
    """Replace each decoder layer's attention and MLP by pruned modules sized from ``config.pruned_layers``."""
    with warnings.catch_warnings():  # a fully pruned block has zero-size weights; initialising them is a no-op
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        for idx, (layer, spec) in enumerate(zip(model.model.layers, config.pruned_layers, strict=True)):
            layer.self_attn = PrunedAttention(config, idx, spec)
            layer.mlp = PrunedMLP(config, spec)


class _PrunedConfigMixin:
    """Adds the per-layer shapes of a pruned model to a family's config."""

    def __init__(self, pruned_layers: list[dict] | None = None, pruning_base_model_type: str = "", **kwargs):
        self.pruned_layers = pruned_layers or []
        self.pruning_base_model_type = pruning_base_model_type
        super().__init__(**kwargs)
        if getattr(self, "head_dim", None) is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


class _PrunedModelMixin:
    """Builds the family's model, then swaps in layers of the recorded pruned shapes."""

    def __init__(self, config):
        super().__init__(config)
        install_pruned_layers(self, config)


class GispPrunedLlamaConfig(_PrunedConfigMixin, LlamaConfig):
    model_type = "gisp_pruned_llama"


class GispPrunedMistralConfig(_PrunedConfigMixin, MistralConfig):
    model_type = "gisp_pruned_mistral"


class GispPrunedQwen2Config(_PrunedConfigMixin, Qwen2Config):
    model_type = "gisp_pruned_qwen2"


class GispPrunedLlamaForCausalLM(_PrunedModelMixin, LlamaForCausalLM):
    config_class = GispPrunedLlamaConfig


class GispPrunedMistralForCausalLM(_PrunedModelMixin, MistralForCausalLM):
    config_class = GispPrunedMistralConfig


class GispPrunedQwen2ForCausalLM(_PrunedModelMixin, Qwen2ForCausalLM):
    config_class = GispPrunedQwen2Config


PRUNED_CLASSES = {
    "llama": (GispPrunedLlamaConfig, GispPrunedLlamaForCausalLM),
    "mistral": (GispPrunedMistralConfig, GispPrunedMistralForCausalLM),
    "qwen2": (GispPrunedQwen2Config, GispPrunedQwen2ForCausalLM),
}
