"""A Nemotron-NAS (DeciLM) folder: the per-layer format vLLM, SGLang, TensorRT-LLM and llama.cpp's converter read.

NVIDIA's ``DeciLMForCausalLM`` describes each layer by a ``block_configs`` entry (vLLM
``nemotron_nas.py``): ``attention.n_heads_in_group`` (key/value heads = the *global* query-head count /
``n_heads_in_group``), ``attention.no_op``, ``ffn.ffn_mult`` (width ``int(2 * ffn_mult * hidden / 3)``
rounded up to a multiple of 256) and ``ffn.no_op``. What it cannot say, and how it is made exact:

- query heads are global: a layer that keeps some heads is padded back to the global count with inert
  zero heads (zero query rows, zero output columns), its key/value heads to a count that divides it
  (zero key/value heads serve only zero query heads);
- a layer without query heads (and without an output bias) is an attention ``no_op``; a layer without MLP
  channels is an ffn ``no_op`` only when its attention is one too: llama.cpp's deci graph skips the residual
  update of a layer whose ffn is a no-op (``continue`` before ``inpL = cur``), so such a layer keeps one
  block of 256 zero channels;
- MLP widths are padded with zero channels to the next multiple of 256, which ``ffn_mult`` expresses;
- biases are all-or-none (``attention_bias`` for q/k/v/o, ``mlp_bias`` for gate/up/down): FLAP's bias
  compensation on ``o_proj``/``down_proj`` switches them on, the projections without one get zeros.

The global head count is the dense model's, so llama.cpp's converter (which takes the head size as
``hidden_size / num_attention_heads``) reads the folder too. The families are those of the deci GGUF
(``gguf_deci.DECI_FAMILIES``): the same graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from gisp_plugin.checkpoint.saving import count_params
from gisp_plugin.export import configuration_decilm
from gisp_plugin.export.api import ExportError, ExportFormat, ExportOptions, ExportReport
from gisp_plugin.export.engine_layers import AttentionTensors, even_groups, pad_heads, pad_mlp, read_layer
from gisp_plugin.export.gguf_deci import check_deci, context_length, sliding_window, tensor_kind
from gisp_plugin.export.hf_native import copy_tokenizer
from gisp_plugin.export.model_parts import model_parts
from gisp_plugin.export.native import PRUNED_FIELDS

FFN_MULTIPLE = 256
T = gguf.MODEL_TENSOR
# DeciLM's own tensor names, by role
NAMES = {
    T.TOKEN_EMBD: "model.embed_tokens.weight",
    T.OUTPUT_NORM: "model.norm.weight",
    T.OUTPUT: "lm_head.weight",
    T.ATTN_NORM: "model.layers.{bid}.input_layernorm.weight",
    T.FFN_NORM: "model.layers.{bid}.post_attention_layernorm.weight",
}
ATTENTION = "model.layers.{bid}.self_attn.{proj}_proj"
MLP = "model.layers.{bid}.mlp.{proj}_proj"


def ffn_mult(width: int, hidden: int) -> float:
    """The multiplier whose DeciLM width (``int(2 * m * hidden / 3)`` up to a multiple of 256) is ``width``."""
    mult = 3 * width / (2 * hidden)
    derived = int(2 * mult * hidden / 3)
    derived = derived if derived % FFN_MULTIPLE == 0 else derived + FFN_MULTIPLE - derived % FFN_MULTIPLE
    if derived != width:
        raise ExportError(f"ffn_mult cannot express an MLP width of {width} at hidden size {hidden}")
    return mult


def kv_heads_for(attention: AttentionTensors, heads: int) -> int:
    """The fewest key/value heads, a divisor of the global ``heads``, into whose groups the layer's heads fit."""
    group = attention.n_head // attention.n_kv if attention.n_kv else 1
    for n_kv in range(max(attention.n_kv, 1), heads + 1):
        if heads % n_kv == 0 and heads // n_kv >= group:
            return n_kv
    raise ExportError(f"{attention.n_head} heads in {attention.n_kv} groups do not fit {heads} global heads")


def _block(attention: AttentionTensors | None, heads: int, mult: float | None) -> dict:
    return {
        "attention": {
            "n_heads_in_group": None if attention is None else heads // attention.n_kv,
            "no_op": attention is None,
            "replace_with_linear": False,
            "sparsify": None,
            "num_sink_tokens": None,
            "unshifted_sink": False,
            "use_prefill_window_in_sink_attention": False,
            "window_length": None,
        },
        "ffn": {"ffn_mult": mult, "no_op": mult is None, "replace_with_linear": False, "sparsify": None},
    }


def _projections(kind: str, bid: int, tensors: dict[str, tuple[torch.Tensor, torch.Tensor | None]], biases: bool) -> dict:
    template = ATTENTION if kind == "attention" else MLP
    state = {}
    for proj, (weight, bias) in tensors.items():
        name = template.format(bid=bid, proj=proj)
        state[f"{name}.weight"] = weight
        if biases:
            state[f"{name}.bias"] = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return state


def write_nemotron_nas(model: PreTrainedModel, tokenizer_folder: Path, out: Path, options: ExportOptions) -> ExportReport:
    """Write ``model`` as a DeciLM folder (call ``check_deci`` first: the same families)."""
    parts = model_parts(model)
    config = model.config
    hidden, heads = config.hidden_size, config.num_attention_heads  # the dense head count
    layers = [read_layer(layer, parts.declaration) for layer in parts.layers]
    attention_bias = any(b is not None for lay in layers for b in (lay.attention.q_bias, lay.attention.o_bias))
    mlp_bias = any(b is not None for lay in layers for b in (lay.mlp.gate_bias, lay.mlp.down_bias))
    state: dict[str, torch.Tensor] = {}
    blocks, notes, shapes = [], [], []
    for index, layer in enumerate(layers):
        kinds = {path: tensor_kind(parts, index, path) for path in layer.others}
        norms = {kind: layer.others[path] for path, kind in kinds.items()}
        attention = even_groups(layer.attention, options.grouping)
        if attention.n_head == 0 and attention.o_bias is None:
            attention = None
        else:
            if attention.head_dim * heads != hidden:
                raise ExportError(
                    f"head size {attention.head_dim} x {heads} heads != hidden size {hidden}; DeciLM needs them equal"
                )
            n_kv = kv_heads_for(attention, heads)
            if (attention.n_head, attention.n_kv) != (heads, n_kv):
                notes.append(f"layer {index}: {attention.n_head}/{attention.n_kv} -> {heads}/{n_kv} heads")
            attention = pad_heads(attention, heads, n_kv)
            a = attention
            tensors = {"q": (a.q, a.q_bias), "k": (a.k, a.k_bias), "v": (a.v, a.v_bias), "o": (a.o, a.o_bias)}
            state.update(_projections("attention", index, tensors, attention_bias))
            state[NAMES[T.ATTN_NORM].format(bid=index)] = norms[T.ATTN_NORM]
        mlp = layer.mlp
        mult = None
        if (
            mlp.width or mlp.down_bias is not None or attention is not None
        ):  # see the module docstring: no ffn no_op after attention
            width = -(-max(mlp.width, 1) // FFN_MULTIPLE) * FFN_MULTIPLE
            if width != mlp.width:
                notes.append(f"layer {index}: {mlp.width} -> {width} MLP channels")
            mlp, mult = pad_mlp(mlp, width), ffn_mult(width, hidden)
            tensors = {"gate": (mlp.gate, mlp.gate_bias), "up": (mlp.up, mlp.up_bias), "down": (mlp.down, mlp.down_bias)}
            state.update(_projections("mlp", index, tensors, mlp_bias))
            state[NAMES[T.FFN_NORM].format(bid=index)] = norms[T.FFN_NORM]
        blocks.append(_block(attention, heads, mult))
        shapes.append(
            [0 if attention is None else attention.n_head, 0 if attention is None else attention.n_kv, mlp.width if mult else 0]
        )
    executed = sum(t.numel() for name, t in state.items())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, len(layers))
    for name, tensor in parts.outside_layers(model).items():
        kind = names.get_type(name, try_suffixes=(".weight", ".bias"))
        if kind not in NAMES:
            raise ExportError(f"{name} has no place in a DeciLM folder")
        state[NAMES[kind]] = tensor
    values = config.to_dict()
    for key in (*PRUNED_FIELDS, "head_dim", "layer_types", "sliding_window", "use_sliding_window", "max_window_layers"):
        values.pop(key, None)
    values.update(
        architectures=["DeciLMForCausalLM"],
        model_type=configuration_decilm.DeciLMConfig.model_type,
        auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
        num_attention_heads=heads,
        num_key_value_heads=heads,
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        max_position_embeddings=context_length(config),
        block_configs=blocks,
    )
    out.mkdir(parents=True)
    save_file(
        {k: v.detach().contiguous().clone() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"}
    )
    (out / "config.json").write_text(json.dumps(values, indent=2))
    shutil.copy(configuration_decilm.__file__, out / "configuration_decilm.py")
    model.generation_config.save_pretrained(out)
    copy_tokenizer(tokenizer_folder, out)
    window = sliding_window(config)
    exact = "exact" + (f" up to its sliding window of {window} tokens (the declared context)" if window else "")
    return ExportReport(
        "nemotron-nas (DeciLMForCausalLM)",
        out,
        exact,
        executed,
        count_params(model)["decoder"],
        notes,
        {"layers": shapes, "attention_bias": attention_bias, "mlp_bias": mlp_bias},
    )


NEMOTRON_NAS = ExportFormat(
    name="nemotron-nas",
    description="a DeciLM folder (block_configs) for vLLM, SGLang, TensorRT-LLM and llama.cpp's convert_hf_to_gguf.py",
    single_file=False,
    check=check_deci,
    write=write_nemotron_nas,
)
