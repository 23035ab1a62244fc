"""Physical compaction of Llama-family models: slice away pruned heads and channels.

The result is a ``GispPruned*ForCausalLM`` whose layers hold only the kept rows and columns, so it is
really smaller and faster, and gives the same outputs as the masked model it came from.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from gisp_plugin.anatomy.llama import ATTN_HEAD, MLP_CHANNEL
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.compaction import modeling_gisp_pruned
from gisp_plugin.compaction.modeling_gisp_pruned import PRUNED_CLASSES
from gisp_plugin.masking.sparsifier import dense_tensor

REMOTE_MODULE = "modeling_gisp_pruned"


def _rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices covered by the given units of ``width`` rows each."""
    return (units[:, None] * width + torch.arange(width)[None, :]).flatten()


def _with_extra(bias: torch.Tensor | None, extra: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The dense bias plus a method's extra bias, in the projection's dtype and device."""
    if extra is None:
        return bias
    extra = extra.detach().to(device=like.device, dtype=like.dtype)
    return extra.clone() if bias is None else bias + extra


def _pad_channels(tensors: dict[str, torch.Tensor | None], count: int, pad_to: int) -> int:
    """Append all-zero MLP channels up to a multiple of ``pad_to``; returns the padded count.

    GPU matrix kernels lose much of their speed on dimensions that are not multiples of 8 (better 64).
    A zero channel adds exactly nothing: its gate pre-activation is 0 and act(0) = 0.
    """
    padded = -(-count // pad_to) * pad_to
    extra = padded - count
    if extra:
        for name, axis in (
            ("mlp.gate_proj.weight", 0),
            ("mlp.up_proj.weight", 0),
            ("mlp.down_proj.weight", 1),
            ("mlp.gate_proj.bias", 0),
            ("mlp.up_proj.bias", 0),
        ):
            t = tensors.get(name)
            if t is not None:
                shape = list(t.shape)
                shape[axis] = extra
                tensors[name] = torch.cat([t, t.new_zeros(shape)], dim=axis)
    return padded


def _compact_layer(
    layer: nn.Module, keep_heads: torch.Tensor, keep_channels: torch.Tensor, extra: dict, prefix: str, pad_to: int
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The pruned-layer spec and the sliced tensors (keys relative to the layer)."""
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    group = (attn.q_proj.out_features // head_dim) // (attn.k_proj.out_features // head_dim)
    heads = keep_heads.nonzero().flatten()
    kv_alive = torch.unique(heads // group)  # sorted
    kv_map = torch.searchsorted(kv_alive, heads // group).tolist()
    q_rows, kv_rows = _rows(heads, head_dim), _rows(kv_alive, head_dim)
    channels = keep_channels.nonzero().flatten()

    def t(module: nn.Module, name: str) -> torch.Tensor | None:
        return dense_tensor(module, name)

    tensors: dict[str, torch.Tensor | None] = {
        "self_attn.q_proj.weight": t(attn.q_proj, "weight")[q_rows],
        "self_attn.k_proj.weight": t(attn.k_proj, "weight")[kv_rows],
        "self_attn.v_proj.weight": t(attn.v_proj, "weight")[kv_rows],
        "self_attn.o_proj.weight": t(attn.o_proj, "weight")[:, q_rows],
        "mlp.gate_proj.weight": t(mlp.gate_proj, "weight")[channels],
        "mlp.up_proj.weight": t(mlp.up_proj, "weight")[channels],
        "mlp.down_proj.weight": t(mlp.down_proj, "weight")[:, channels],
        "self_attn.o_proj.bias": _with_extra(
            t(attn.o_proj, "bias"), extra.get(f"{prefix}.self_attn.o_proj"), t(attn.o_proj, "weight")
        ),
        "mlp.down_proj.bias": _with_extra(
            t(mlp.down_proj, "bias"), extra.get(f"{prefix}.mlp.down_proj"), t(mlp.down_proj, "weight")
        ),
    }
    qkv_bias = attn.q_proj.bias is not None
    if qkv_bias:
        tensors["self_attn.q_proj.bias"] = t(attn.q_proj, "bias")[q_rows]
        tensors["self_attn.k_proj.bias"] = t(attn.k_proj, "bias")[kv_rows]
        tensors["self_attn.v_proj.bias"] = t(attn.v_proj, "bias")[kv_rows]
    mlp_bias = mlp.gate_proj.bias is not None
    if mlp_bias:
        tensors["mlp.gate_proj.bias"] = t(mlp.gate_proj, "bias")[channels]
        tensors["mlp.up_proj.bias"] = t(mlp.up_proj, "bias")[channels]
    intermediate = len(channels)
    if pad_to > 1:
        if float(mlp.act_fn(torch.zeros(1))) != 0.0:
            raise ValueError(f"cannot pad MLP channels: activation {type(mlp.act_fn).__name__} is not 0 at 0")
        intermediate = _pad_channels(tensors, intermediate, pad_to)
    spec = {
        "num_heads": len(heads),
        "num_kv_heads": len(kv_alive),
        "kv_map": kv_map,
        "intermediate_size": intermediate,
        "qkv_bias": qkv_bias,
        "o_bias": tensors["self_attn.o_proj.bias"] is not None,
        "mlp_bias": mlp_bias,
        "down_bias": tensors["mlp.down_proj.bias"] is not None,
    }
    for name, module in layer.named_children():  # norms and anything else outside attention/MLP
        if name not in ("self_attn", "mlp"):
            for key, value in module.state_dict().items():
                tensors[f"{name}.{key}"] = value
    return spec, {key: value.detach().clone() for key, value in tensors.items() if value is not None}


def pruned_config(dense_config, specs: list[dict]):
    """The config of the compacted model: the dense one plus per-layer shapes and remote-code pointers."""
    family = dense_config.model_type
    config_cls, model_cls = PRUNED_CLASSES[family]
    values = dense_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "pruned_layers"):
        values.pop(key, None)
    config = config_cls(**values, pruned_layers=specs, pruning_base_model_type=family)
    config.architectures = [model_cls.__name__]
    config.auto_map = {
        "AutoConfig": f"{REMOTE_MODULE}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{REMOTE_MODULE}.{model_cls.__name__}",
    }
    config._attn_implementation = dense_config._attn_implementation
    return config


def compact_llama_family(
    model: PreTrainedModel, keep: KeepMask, extra_biases: dict[str, torch.Tensor] | None = None, pad_to: int = 1
) -> PreTrainedModel:
    """A new, physically smaller model equal in outputs to ``model`` masked by ``keep``.

    ``extra_biases`` maps a module path (``model.layers.3.self_attn.o_proj``) to a bias a method adds to
    that projection's output (FLAP's bias compensation); it is folded into the compacted layer.
    ``pad_to`` > 1 rounds each layer's MLP width up with zero channels (same outputs, GPU-friendly shapes).
    """
    extra = extra_biases or {}
    specs, state = [], {}
    for idx, layer in enumerate(model.model.layers):
        spec, tensors = _compact_layer(layer, keep[idx, ATTN_HEAD], keep[idx, MLP_CHANNEL], extra, f"model.layers.{idx}", pad_to)
        specs.append(spec)
        state.update({f"model.layers.{idx}.{key}": value for key, value in tensors.items()})
    for key, value in model.state_dict().items():
        if not key.startswith("model.layers."):
            state[key] = value.detach().clone()

    config = pruned_config(model.config, specs)
    _, model_cls = PRUNED_CLASSES[model.config.model_type]
    with torch.device("meta"):
        compact = model_cls(config)
    compact.load_state_dict(state, strict=False, assign=True)
    _copy_buffers(model, compact)
    compact.tie_weights()
    missing = [name for name, p in list(compact.named_parameters()) + list(compact.named_buffers()) if p.is_meta]
    if missing:
        raise RuntimeError(f"compaction left tensors unset: {missing[:5]}")
    compact.generation_config = model.generation_config
    compact.eval()
    return compact


def _copy_buffers(source: nn.Module, target: nn.Module) -> None:
    """Carry non-persistent buffers (rotary frequencies) that a meta-built model lacks."""
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(target.named_buffers()):
        if buffer.is_meta and name in source_buffers:
            owner_path, _, attr = name.rpartition(".")
            owner = target.get_submodule(owner_path)
            owner._buffers[attr] = source_buffers[name].clone()


__all__ = ["compact_llama_family", "modeling_gisp_pruned", "pruned_config"]
