"""GGUF for llama.cpp (and Ollama, LM Studio, everything built on it), architecture ``deci``: per-layer shapes.

llama.cpp's ``deci`` graph (``src/models/deci.cpp``) reads ``head_count``, ``head_count_kv`` and
``feed_forward_length`` per layer, so a pruned model runs at its pruned size. What the graph computes,
and so which families it expresses exactly (``DECI_FAMILIES``): RMS norms, a SiLU-gated MLP, rotary
embeddings over the whole head in llama.cpp's adjacent-pair layout (query and key rows are reordered
within each head from Hugging Face's two halves), optional biases on every projection, tied or separate
LM head, Llama 3's rotary frequency factors. Gemma (GeLU, scaled embeddings, soft-capping), Qwen3
(per-head q/k norms), Phi-4-mini (partial rotary) and mixtures of experts are outside it: export them with
``--format hf`` and the engine's own converter.

Traps of the graph, each handled so the file computes what the compacted model does:

- query head ``h`` reads key/value head ``h // group`` and the group is one number per layer: uneven
  groups are made even exactly (``engine_layers.even_groups``);
- a layer with attention but ``feed_forward_length == 0`` skips its residual update (the loop
  ``continue``s before ``inpL = cur``): such a layer keeps one zero MLP channel;
- a layer without query heads ignores its attention output bias: it keeps one zero head when it has one;
- head size is read from layer 0 (``n_embd / n_head(0)`` when no key length is given, and the key length
  only when layer 0 has heads): layer 0 keeps one zero head when it has none;
- a head-less layer has no attention norm, an MLP-less layer no MLP norm: only tensors the graph reads are
  written, or llama.cpp refuses the file for its tensor count.

``q8_0`` quantises rows in blocks of 32: MLP widths are padded with zero channels to a multiple of 32 so the
down projection quantises too; any other matrix whose row length is not a multiple of 32 stays ``f16``.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from gisp_plugin.checkpoint.saving import count_params
from gisp_plugin.export.api import ExportError, ExportFormat, ExportOptions, ExportReport
from gisp_plugin.export.engine_layers import EngineLayer, even_groups, pad_mlp, read_layer, zero_head_attention
from gisp_plugin.export.gguf_tokenizer import add_tokenizer
from gisp_plugin.export.model_parts import ModelParts, is_tied, model_parts

ARCH = gguf.MODEL_ARCH.DECI
# families whose own modelling code computes exactly what the deci graph does, and why
DECI_FAMILIES = {
    "llama": "Llama 2/3 (RMS norms, SiLU-gated MLP, full rotary, optional biases, Llama 3 rotary factors)",
    "mistral": "Mistral (as Llama; a sliding window caps the GGUF context at the window, exact within it)",
    "qwen2": "Qwen2/2.5 (as Llama, with q/k/v biases; its sliding window is off as published)",
    "phi3": "Phi-3/3.5-mini (fused qkv_proj and gate_up_proj written as deci's separate tensors; full rotary only)",
}
ROPE_TYPES = ("default", "linear", "llama3")
Q8_BLOCK = 32
T = gguf.MODEL_TENSOR
TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def _rope(config) -> dict:
    return getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0}


def sliding_window(config) -> int | None:
    """The window the family's attention applies, or None (absent, or switched off as Qwen2 publishes it)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def context_length(config) -> int:
    """The context the GGUF declares: the model's, capped at its sliding window (deci attends to everything)."""
    window = sliding_window(config)
    return min(config.max_position_embeddings, window) if window else config.max_position_embeddings


def check_deci(model: PreTrainedModel, options: ExportOptions) -> None:
    """Refuse, in one line, a model whose computation the deci graph does not express exactly."""
    parts = model_parts(model)
    if parts.family not in DECI_FAMILIES:
        raise ExportError(
            f"llama.cpp's deci graph cannot run a {parts.family!r} model exactly (gguf exports {', '.join(DECI_FAMILIES)}); "
            "export it with --format hf and convert that with llama.cpp's convert_hf_to_gguf.py"
        )
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"deci's MLP uses SiLU; this model's hidden_act is {config.hidden_act!r}: use --format hf")
    if (getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise ExportError(
            f"deci rotates whole heads, this model {config.partial_rotary_factor} of each (partial rotary): use --format hf"
        )
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ExportError(f"deci runs rotary scaling {', '.join(ROPE_TYPES)}; this model uses {rope_type!r}: use --format hf")
    for index, layer in enumerate(parts.layers):
        others = read_layer(layer, parts.declaration).others
        unread = [f"{parts.layers_path}.{index}.{path}" for path in others if tensor_kind(parts, index, path) is None]
        if unread:
            raise ExportError(f"deci has no place for {', '.join(unread)}: use --format hf")


def _gguf_name(tensor: T, bid: int | None = None, suffix: str = "weight") -> str:
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=bid)}.{suffix}"


def tensor_kind(parts: ModelParts, index: int, path: str) -> T | None:
    """The deci role (``ATTN_NORM``, ``FFN_NORM``) of a tensor of layer ``index`` (its path in the layer), per gguf-py's map."""
    names = gguf.get_tensor_name_map(ARCH, len(parts.layers))
    return names.get_type(f"{parts.layers_path}.{index}.{path}", try_suffixes=(".weight", ".bias"))


def _interleave_rotary(rows: torch.Tensor | None, n_heads: int) -> torch.Tensor | None:
    """Rows of each head from Hugging Face's (first half, second half) rotary layout to llama.cpp's adjacent pairs."""
    if rows is None or n_heads == 0:
        return rows
    return rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _prepare(layer: EngineLayer, index: int, options: ExportOptions, notes: list[str]) -> EngineLayer:
    """The layer made even and free of the graph's traps (see the module docstring)."""
    attention = even_groups(layer.attention, options.grouping)
    if attention.n_head != layer.attention.n_head or attention.n_kv != layer.attention.n_kv:
        before = f"{layer.attention.n_head}/{layer.attention.n_kv}"
        notes.append(f"layer {index}: uneven groups {before} -> {attention.n_head}/{attention.n_kv} heads")
    if attention.n_head == 0 and (index == 0 or attention.o_bias is not None):
        attention = zero_head_attention(attention)
        notes.append(
            f"layer {index}: one zero head ({'head size is read from layer 0' if index == 0 else 'keeps its output bias'})"
        )
    mlp = layer.mlp
    if mlp.width == 0 and (attention.n_head > 0 or mlp.down_bias is not None):
        mlp = pad_mlp(mlp, 1)
        notes.append(f"layer {index}: one zero MLP channel (a layer without one skips its residual update)")
    if options.weight_type == "q8_0" and mlp.width % Q8_BLOCK:
        mlp = pad_mlp(mlp, -(-mlp.width // Q8_BLOCK) * Q8_BLOCK)
    return EngineLayer(attention, mlp, layer.others)


def _layer_tensors(parts: ModelParts, layer: EngineLayer, index: int) -> dict[str, torch.Tensor]:
    """The GGUF tensors of one prepared layer: only those the deci graph reads."""
    att, mlp = layer.attention, layer.mlp
    tensors: dict[str, torch.Tensor | None] = {}
    norms = {_gguf_name(tensor_kind(parts, index, path), index): tensor for path, tensor in layer.others.items()}
    if att.n_head:
        tensors.update(
            {
                _gguf_name(T.ATTN_Q, index): _interleave_rotary(att.q, att.n_head),
                _gguf_name(T.ATTN_K, index): _interleave_rotary(att.k, att.n_kv),
                _gguf_name(T.ATTN_V, index): att.v,
                _gguf_name(T.ATTN_OUT, index): att.o,
                _gguf_name(T.ATTN_Q, index, "bias"): _interleave_rotary(att.q_bias, att.n_head),
                _gguf_name(T.ATTN_K, index, "bias"): _interleave_rotary(att.k_bias, att.n_kv),
                _gguf_name(T.ATTN_V, index, "bias"): att.v_bias,
                _gguf_name(T.ATTN_OUT, index, "bias"): att.o_bias,
            }
        )
        tensors[_gguf_name(T.ATTN_NORM, index)] = norms.get(_gguf_name(T.ATTN_NORM, index))
    if mlp.width:
        tensors.update(
            {
                _gguf_name(T.FFN_GATE, index): mlp.gate,
                _gguf_name(T.FFN_UP, index): mlp.up,
                _gguf_name(T.FFN_DOWN, index): mlp.down,
                _gguf_name(T.FFN_GATE, index, "bias"): mlp.gate_bias,
                _gguf_name(T.FFN_UP, index, "bias"): mlp.up_bias,
                _gguf_name(T.FFN_DOWN, index, "bias"): mlp.down_bias,
            }
        )
        tensors[_gguf_name(T.FFN_NORM, index)] = norms.get(_gguf_name(T.FFN_NORM, index))
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


def _rope_factors(config) -> torch.Tensor | None:
    """Llama 3's per-frequency divisors of the rotary frequencies (``rope_freqs``), from transformers' own rule."""
    rope = _rope(config)
    if rope.get("rope_type") != "llama3":
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled.to(torch.float64)).to(torch.float32)


def _add_tensor(writer: gguf.GGUFWriter, name: str, tensor: torch.Tensor, weight_type: str) -> None:
    data = tensor.detach().to(torch.float32).cpu().numpy()
    qtype = TYPES[weight_type][0] if data.ndim == 2 else gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % Q8_BLOCK:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_tensor(name, data.astype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def write_deci(model: PreTrainedModel, tokenizer_folder: Path, out: Path, options: ExportOptions) -> ExportReport:
    """Write ``model`` as one GGUF file of architecture deci (call ``check_deci`` first)."""
    parts = model_parts(model)
    config = model.config
    notes: list[str] = []
    prepared = [_prepare(read_layer(layer, parts.declaration), index, options, notes) for index, layer in enumerate(parts.layers)]
    head_dim = next(layer.attention.head_dim for layer in prepared)
    writer = gguf.GGUFWriter(out, ARCH_NAME)
    writer.add_block_count(len(prepared))
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length([layer.mlp.width for layer in prepared])
    writer.add_head_count([layer.attention.n_head for layer in prepared])
    writer.add_head_count_kv([layer.attention.n_kv if layer.attention.n_head else 0 for layer in prepared])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    embedding = model.get_input_embeddings().weight
    writer.add_vocab_size(embedding.shape[0])
    writer.add_file_type(TYPES[options.weight_type][1])
    tokenizer = add_tokenizer(writer, tokenizer_folder, embedding.shape[0], options.tokenizer_pre)

    names = gguf.get_tensor_name_map(ARCH, len(prepared))
    for name, tensor in parts.outside_layers(model).items():
        if is_tied(model) and tensor is model.get_output_embeddings().weight and name != _embedding_name(model):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{name} has no place in a deci GGUF file")
        _add_tensor(writer, gguf_name, tensor, options.weight_type)
    factors = _rope_factors(config)
    if factors is not None:
        writer.add_tensor(_gguf_name(T.ROPE_FREQS), factors.numpy())
    executed = 0
    for index, layer in enumerate(prepared):
        for name, tensor in _layer_tensors(parts, layer, index).items():
            _add_tensor(writer, name, tensor, options.weight_type)
            executed += tensor.numel()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    window = sliding_window(config)
    exact = "exact" + (f" up to its sliding window of {window} tokens (the declared context)" if window else "")
    return ExportReport(
        f"gguf ({ARCH_NAME}, {options.weight_type})",
        out,
        exact if options.weight_type == "f32" else f"{exact} up to {options.weight_type} rounding",
        executed,
        count_params(model)["decoder"],
        notes,
        {"tokenizer": tokenizer, "layers": [[lay.attention.n_head, lay.attention.n_kv, lay.mlp.width] for lay in prepared]},
    )


ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]


def _embedding_name(model: PreTrainedModel) -> str:
    weight = model.get_input_embeddings().weight
    return next(name for name, param in model.named_parameters() if param is weight)


GGUF = ExportFormat(
    name="gguf",
    description="one GGUF file for llama.cpp / Ollama, architecture deci (per-layer head counts and MLP widths)",
    single_file=True,
    check=check_deci,
    write=write_deci,
)
