"""Hugging Face modelling code for structurally pruned models of any Llama-like family.

This file is copied next to every saved pruned model so that it loads with plain
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``: it depends only on torch and
transformers. A pruned model is the family's own model (its attention, norms, rotary embeddings,
soft-capping and scaling untouched) whose projections are resized layer by layer to the shapes in
``config.pruned_layers``:

- ``modules``: every resized module (relative to the decoder layer): a ``linear`` layer with its new
  shape, where ``gather`` lists output rows to repeat so that under uneven grouped-query attention each
  query head gets its own copy of the key/value head it reads (the family's ``repeat_kv`` needs equal
  groups); ``projection_norm``, a norm over a whole projection that keeps its dense divisor (OLMoE), and
  under uneven groups repeats the key rows after normalising (``gather``);
  ``ragged_experts``, the live routed experts each with its own width; ``parameters``, a
  module (a router) whose parameters and buffers (a score-correction bias) shrink and whose attributes
  (``top_k``) change, or that routes no token (``no_experts``: every expert gone);
- ``attention``: the head counts the family's attention reads at run time. A layer without query heads
  only keeps the key/value cache in step and adds its output bias, if any. ``None`` in a model pruned in
  its MLPs only (a hybrid's mixers stay whole).

The classes are made on first use for any family transformers knows, named after its config class:
``GispPrunedQwen2Config`` and ``GispPrunedQwen2ForCausalLM``, ``GispPrunedGemma3TextConfig`` and
``GispPrunedGemma3TextForCausalLM``.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

PREFIX = "GispPruned"


class GatheredLinear(nn.Linear):
    """A linear layer whose output rows are picked (and repeated) by ``gather``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, gather: list[int]):
        super().__init__(in_features, out_features, bias=bias)
        self.gather = list(gather)
        self._index: dict[torch.device, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if out.device not in self._index:
            self._index[out.device] = torch.tensor(self.gather, dtype=torch.long, device=out.device)
        return out.index_select(-1, self._index[out.device])


class LayerConfigView:
    """The model's config as one layer sees it: a few fields (head counts) overridden, the rest shared.

    Reads and writes of other fields go to the shared config, so a later change of the attention
    implementation reaches every layer.
    """

    def __init__(self, base, overrides: dict):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides))

    def __getattr__(self, name: str):
        overrides = object.__getattribute__(self, "_overrides")
        return overrides[name] if name in overrides else getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(object.__getattribute__(self, "_base"), name, value)


def _no_heads_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """Attention of a layer that lost every query head: output bias only, key/value cache kept in step."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    batch, seq = hidden_states.shape[:-1]
    if cache is not None:  # the cache's sequence length must stay right for the layers after this one
        # one zero key/value head, never read: a cache of zero heads holds no elements and reports length 0
        # (transformers' DynamicLayer), so the next token of the whole model would get position 0
        placeholder = hidden_states.new_zeros(batch, 1, seq, self.head_dim)
        cache.update(placeholder, placeholder, self.layer_idx)
    output = getattr(self, self.gisp_output_projection)
    return output(hidden_states.new_zeros(batch, seq, 0)), None


def _no_experts_forward(self, hidden_states: torch.Tensor, *args, **kwargs):
    """Router of a layer that lost every routed expert: every logit ``-inf``, no expert picked (a shared expert,
    if any, still runs); the family's own rule might not run over zero experts (Phi-MoE's sparse mixer)."""
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
    logits = hidden_states.new_full((tokens, 0), float("-inf"), dtype=torch.float32)
    picked = hidden_states.new_zeros((tokens, 0))
    return logits, picked, picked.long()


class ProjectionRMSNorm(nn.Module):
    """An RMS norm over a whole query or key projection (OLMoE, OLMo 2) that lost some heads' features.

    It divides by the dense projection's width, as the masked model's norm does over its zeroed
    features, so the compacted model computes the same thing. Under uneven key/value groups, ``gather``
    repeats its output rows (each query head its own copy of the key head it reads) after normalising, so
    the mean is taken over each surviving key head once, as in the masked model.
    """

    def __init__(self, features: int, dense_features: int, eps: float, gather: list[int] | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.dense_features = dense_features
        self.variance_epsilon = eps
        self.gather = None if gather is None else list(gather)
        self._index: dict[torch.device, torch.Tensor] = {}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).sum(-1, keepdim=True) / self.dense_features
        out = self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(dtype)
        if self.gather is None:
            return out
        if out.device not in self._index:
            self._index[out.device] = torch.tensor(self.gather, dtype=torch.long, device=out.device)
        return out.index_select(-1, self._index[out.device])


class ExpertMLP(nn.Module):
    """One routed expert of its own width: fused gate/up rows, down columns (as the stacked experts)."""

    def __init__(self, hidden_size: int, width: int, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class RaggedExperts(nn.ModuleList):
    """The live experts of a pruned mixture-of-experts layer, each with its own number of channels.

    Called like the family's stacked experts: ``(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k])``; every expert adds its weighted output for the tokens routed to it.
    """

    def __init__(self, hidden_size: int, widths: list[int], act_fn: nn.Module):
        super().__init__(ExpertMLP(hidden_size, width, act_fn) for width in widths)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if token.numel():
                routed = expert(hidden_states[token]) * top_k_weights[token, slot, None]
                out.index_add_(0, token, routed.to(out.dtype))
        return out


def _resized(layer: nn.Module, path: str, spec: dict) -> None:
    """Put a module of the recorded shape at ``path`` (or resize the parameters of the one there)."""
    if spec["type"] == "linear":
        if spec.get("gather") is not None:
            module = GatheredLinear(spec["in_features"], spec["out_features"], spec["bias"], spec["gather"])
        else:
            module = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
        layer.set_submodule(path, module)
    elif spec["type"] == "projection_norm":
        norm = ProjectionRMSNorm(spec["features"], spec["dense_features"], spec["eps"], spec.get("gather"))
        layer.set_submodule(path, norm)
    elif spec["type"] == "ragged_experts":
        act_fn = layer.get_submodule(path).act_fn
        layer.set_submodule(path, RaggedExperts(spec["hidden_size"], spec["widths"], act_fn))
    elif spec["type"] == "parameters":
        module = layer.get_submodule(path)
        for name, shape in spec["shapes"].items():
            setattr(module, name, nn.Parameter(torch.empty(shape)))
        for name, shape in spec.get("buffers", {}).items():
            module.register_buffer(name, torch.empty(shape), persistent=name not in module._non_persistent_buffers_set)
        for name, value in spec["attributes"].items():
            setattr(module, name, value)
        if spec.get("no_experts"):
            module.forward = types.MethodType(_no_experts_forward, module)
    else:
        raise ValueError(f"unknown pruned module type {spec['type']!r} at {path}")


def install_pruned_layers(model: nn.Module, config) -> None:
    """Resize each decoder layer's projections and set its head counts from ``config.pruned_layers``."""
    with warnings.catch_warnings():  # a fully pruned block has zero-size weights; initialising them is a no-op
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        for layer, spec in zip(model.model.layers, config.pruned_layers, strict=True):
            for path, module_spec in spec["modules"].items():
                _resized(layer, path, module_spec)
            attention = spec["attention"]
            if attention is None:  # pruned in its MLPs only: the layer's mixer is the family's, whole
                continue
            attn = layer.get_submodule(attention["module"])
            heads = {key: attention[key] for key in ("num_key_value_heads", "num_key_value_groups")}
            for key, value in heads.items():
                setattr(attn, key, value)
            if hasattr(attn, "num_heads"):  # families that shape the queries by it (StableLM, Phi)
                attn.num_heads = attention["num_heads"]
            attn.config = LayerConfigView(config, {"num_attention_heads": attention["num_heads"], **heads})
            if attention["num_heads"] == 0:
                attn.gisp_output_projection = attention["output_projection"]
                attn.forward = types.MethodType(_no_heads_forward, attn)


class _PrunedConfigMixin:
    """Adds the per-layer shapes of a pruned model to a family's config."""

    def __init__(
        self,
        pruned_layers: list[dict] | None = None,
        pruning_base_model_type: str = "",
        removed_layers: list[int] | None = None,
        **kwargs,
    ):
        self.pruned_layers = pruned_layers or []
        self.pruning_base_model_type = pruning_base_model_type
        self.removed_layers = list(removed_layers or [])
        super().__init__(**kwargs)


class _PrunedModelMixin:
    """Builds the family's model, then resizes its layers to the recorded pruned shapes."""

    def __init__(self, config):
        super().__init__(config)
        install_pruned_layers(self, config)

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: the family's own ``_init_weights`` (transformers' guarded init functions, which leave loaded
        tensors alone) runs on load. As custom code, a module whose own tensors all loaded would be skipped, and
        a buffer a parent module computes would stay unset (Falcon-H1's ``mup_vector``, set by the model's init)."""
        return False


_CLASSES: dict[str, tuple[type, type]] = {}


def pruned_classes(model_type: str) -> tuple[type, type]:
    """The pruned config and causal-LM classes of a family (``config.model_type`` of the dense model)."""
    if model_type not in _CLASSES:
        # the mappings include families a plugin registered (AutoConfig.register, AutoModelForCausalLM.register)
        if model_type not in CONFIG_MAPPING or CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise KeyError(f"transformers has no causal language model of type {model_type!r}")
        config_cls = CONFIG_MAPPING[model_type]
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[config_cls]
        pruned_config = type(
            f"{PREFIX}{config_cls.__name__}",
            (_PrunedConfigMixin, config_cls),
            {"model_type": f"gisp_pruned_{model_type}", "__module__": __name__},
        )
        stem = config_cls.__name__.removesuffix("Config")  # config class names are unique, model class names not
        pruned_model = type(
            f"{PREFIX}{stem}ForCausalLM", (_PrunedModelMixin, model_cls), {"config_class": pruned_config, "__module__": __name__}
        )
        _CLASSES[model_type] = (pruned_config, pruned_model)
    return _CLASSES[model_type]


def _is_causal_lm(model_type: str) -> bool:
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or CONFIG_MAPPING[model_type] in MODEL_FOR_CAUSAL_LM_MAPPING


def __getattr__(name: str) -> type:
    """``GispPrunedQwen2Config`` and the like, for ``auto_map`` in a saved folder's config."""
    stem = name.removeprefix(PREFIX).removesuffix("Config").removesuffix("ForCausalLM")
    registered = {key: CONFIG_MAPPING[key].__name__ for key in CONFIG_MAPPING if key not in CONFIG_MAPPING_NAMES}
    for model_type, config_name in {**CONFIG_MAPPING_NAMES, **registered}.items():
        if name.startswith(PREFIX) and config_name == f"{stem}Config" and _is_causal_lm(model_type):
            pruned_config, pruned_model = pruned_classes(model_type)
            if name in (pruned_config.__name__, pruned_model.__name__):
                return pruned_config if name == pruned_config.__name__ else pruned_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
