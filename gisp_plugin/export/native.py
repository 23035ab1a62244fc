"""The family's own model for a compacted one: loads with ``trust_remote_code=False`` in every engine.

When every layer of a compacted model has the same shape (query and key/value heads in even groups, one
MLP width), the family's own config expresses it: the head counts and ``intermediate_size`` change, the
head size is kept (``head_dim``), removed layers are already renumbered. ``to_native`` builds that model
from the compacted model's tensors, laid out as the family lays them (even groups contiguous, fused
projections fused again), and checks it before anyone relies on it: the family's model must take every
tensor with no other left unset (biases the family only has in all-or-none form, such as Llama's
``attention_bias``, are switched on and the missing ones are zero), and its logits on a few random tokens,
with and without the key/value cache, must equal the compacted model's. Otherwise ``NativeFormError``
says why, and the caller keeps the pruned form (``modeling_gisp_pruned.py``).

With ``pad=True`` (``gisp export --format hf``) layers are first padded to one shape with inert zero heads
and zero MLP channels: the result is exact and loads natively everywhere, at the cost of executing the
padding (reported). Mixtures of experts are not converted (stacked experts need one width and one count
per layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from gisp_plugin.anatomy.decoder import DecoderDeclaration
from gisp_plugin.compaction.decoder import copy_meta_buffers
from gisp_plugin.export.engine_layers import EngineLayer, even_groups, pad_heads, pad_mlp, read_layer
from gisp_plugin.export.model_parts import ModelParts, model_parts

PRUNED_FIELDS = ("pruned_layers", "pruning_base_model_type", "removed_layers", "auto_map", "architectures", "model_type")
BIAS_SWITCHES = ("attention_bias", "mlp_bias")  # config fields that give every attention / MLP projection a bias


class NativeFormError(ValueError):
    """A compacted model that its family's own config cannot express exactly; the message says why."""


@dataclass(frozen=True)
class NativeShape:
    """The one shape every layer has: query heads, key/value heads, head size, MLP width."""

    n_head: int
    n_kv: int
    head_dim: int
    width: int


def _uniform_shape(layers: list[EngineLayer], pad: bool) -> NativeShape:
    """The shared shape of the layers, or (``pad``) the smallest one every layer pads up to."""
    shapes = {(lay.attention.n_head, lay.attention.n_kv, lay.mlp.width) for lay in layers}
    head_dim = layers[0].attention.head_dim
    if len(shapes) == 1:
        n_head, n_kv, width = shapes.pop()
        if n_head and n_kv:
            return NativeShape(n_head, n_kv, head_dim, width)
    if not pad:
        described = ", ".join(f"{h}/{kv} heads, {w} channels" for h, kv, w in sorted(shapes))
        raise NativeFormError(f"layers differ in shape ({described}); per-layer shapes need modeling_gisp_pruned.py")
    n_kv = max(max(lay.attention.n_kv for lay in layers), 1)
    group = max((lay.attention.n_head // lay.attention.n_kv for lay in layers if lay.attention.n_kv), default=1)
    return NativeShape(group * n_kv, n_kv, head_dim, max(lay.mlp.width for lay in layers))


def _shape_the_config_accepts(model: PreTrainedModel, parts: ModelParts, shape: NativeShape) -> NativeShape:
    """``shape``, or the one with the fewest more query heads (then key/value heads) that the family's config accepts.

    Some configs tie the head count to the hidden size (Llama refuses a hidden size that is not a multiple
    of the query heads, even with ``head_dim`` given); padding with inert heads is exact all the same.
    """
    group = shape.n_head // shape.n_kv
    first_error = None
    for n_head in range(shape.n_head, model.config.hidden_size + 1):
        for n_kv in range(shape.n_kv, n_head // group + 1):
            if n_head % n_kv:
                continue
            candidate = replace(shape, n_head=n_head, n_kv=n_kv)
            try:
                _native_config(model, parts, candidate, {})
            except NativeFormError as err:
                first_error = first_error or err
                continue
            return candidate
    raise first_error or NativeFormError(f"no head count the {parts.family} config accepts holds {shape.n_head} heads")


def _layer_state(layer: EngineLayer, declaration: DecoderDeclaration) -> dict[str, torch.Tensor]:
    """One layer's tensors under the family's own names (fused projections fused again)."""
    att, mlp = layer.attention, layer.mlp
    a, m = declaration.attention, declaration.mlp
    state = dict(layer.others)
    projections = {
        f"{a.module}.{a.o}": (att.o, att.o_bias),
        f"{m.module}.{m.down}": (mlp.down, mlp.down_bias),
    }
    if a.qkv is not None:
        biases = (att.q_bias, att.k_bias, att.v_bias)
        bias = None if any(b is None for b in biases) else torch.cat(biases)
        projections[f"{a.module}.{a.qkv}"] = (torch.cat([att.q, att.k, att.v]), bias)
    else:
        projections.update(
            {
                f"{a.module}.{a.q}": (att.q, att.q_bias),
                f"{a.module}.{a.k}": (att.k, att.k_bias),
                f"{a.module}.{a.v}": (att.v, att.v_bias),
            }
        )
    if m.gate_up is not None:
        bias = None if mlp.gate_bias is None or mlp.up_bias is None else torch.cat([mlp.gate_bias, mlp.up_bias])
        projections[f"{m.module}.{m.gate_up}"] = (torch.cat([mlp.gate, mlp.up]), bias)
    else:
        projections[f"{m.module}.{m.up}"] = (mlp.up, mlp.up_bias)
        if m.gate is not None:
            projections[f"{m.module}.{m.gate}"] = (mlp.gate, mlp.gate_bias)
    for path, (weight, bias) in projections.items():
        state[f"{path}.weight"] = weight
        if bias is not None:
            state[f"{path}.bias"] = bias
    return state


def _native_layer(layer: nn.Module, declaration: DecoderDeclaration) -> EngineLayer:
    """One layer read as plain tensors, its norms over whole q/k projections made exact in the family's own norm.

    A compacted ``ProjectionRMSNorm`` (OLMo 2's) divides by the dense width ``D``; the family's norm by its own
    width ``n``. Scaling the projection's rows by ``c = sqrt(n / D)`` and the norm's weight by ``1 / c`` gives
    ``w / c * c x / sqrt(c^2 |x|^2 / n + eps) = w x / sqrt(|x|^2 / D + eps)``: the same output, exactly. A key
    norm that repeats its rows (uneven groups) is refused before reading.
    """
    names = declaration.attention
    norms = {
        which: (name, layer.get_submodule(f"{names.module}.{name}"))
        for which, name in zip(("q", "k"), names.projection_norms or ("", ""), strict=True)
        if name
    }
    for name, norm in norms.values():
        if getattr(norm, "gather", None) is not None:
            raise NativeFormError(
                f"{names.module}.{name} repeats key rows (uneven groups); per-layer shapes need modeling_gisp_pruned.py"
            )
    engine = read_layer(layer, declaration)
    att, others = engine.attention, dict(engine.others)
    scaled = {}
    for which, (name, norm) in norms.items():
        dense = getattr(norm, "dense_features", None)
        if dense is None:
            continue
        rows = getattr(att, which)
        c = math.sqrt(rows.shape[0] / dense)
        bias = getattr(att, f"{which}_bias")
        scaled[which] = rows * c
        scaled[f"{which}_bias"] = None if bias is None else bias * c
        others[f"{names.module}.{name}.weight"] = others[f"{names.module}.{name}.weight"] / c
    return EngineLayer(replace(att, **scaled), engine.mlp, others)


def _native_config(model: PreTrainedModel, parts: ModelParts, shape: NativeShape, switches: dict[str, bool]):
    values = model.config.to_dict()
    for key in PRUNED_FIELDS:
        values.pop(key, None)
    values.update(
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_kv,
        head_dim=shape.head_dim,
        intermediate_size=shape.width,
        **switches,
    )
    try:
        config = CONFIG_MAPPING[parts.family](**values)
    except (StrictDataclassError, ValueError) as err:  # fields validated together (Llama: hidden size vs heads)
        reason = str(err).strip().splitlines()[-1].strip()
        raise NativeFormError(f"the {parts.family} config refuses {shape.n_head}/{shape.n_kv} heads: {reason}") from None
    config._attn_implementation = model.config._attn_implementation
    return config


def _build(model: PreTrainedModel, parts: ModelParts, shape: NativeShape, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """The family's model holding ``state``; bias switches turned on where the state has biases the family lacks."""
    switches: dict[str, bool] = {}
    for _ in range(len(BIAS_SWITCHES) + 1):
        config = _native_config(model, parts, shape, switches)
        try:
            with torch.device("meta"):
                native = AutoModelForCausalLM.from_config(config)
        except ValueError as err:  # the family's model refuses the shape (StableLM: hidden size not a multiple of heads)
            raise NativeFormError(f"the {parts.family} model refuses {shape.n_head}/{shape.n_kv} heads: {err}") from None
        expected = dict(native.state_dict())
        unexpected = sorted(set(state) - set(expected))
        wanted = [s for s in BIAS_SWITCHES if hasattr(config, s) and not getattr(config, s) and unexpected]
        if unexpected and wanted and all(name.endswith(".bias") for name in unexpected):
            switches.update(dict.fromkeys(wanted, True))
            continue
        break
    if unexpected:
        raise NativeFormError(f"the {parts.family} config has no place for {', '.join(unexpected[:3])}")
    tied = {name for name, _ in native.named_parameters(remove_duplicate=False)} - {name for name, _ in native.named_parameters()}
    missing = [name for name in expected if name not in state and name not in tied]
    for name in missing:
        if not name.endswith(".bias"):
            raise NativeFormError(f"the {parts.family} model needs {name}, which the compacted model does not hold")
        state[name] = torch.zeros(expected[name].shape, dtype=model.dtype)
    wrong = [name for name, tensor in state.items() if tuple(tensor.shape) != tuple(expected[name].shape)]
    if wrong:
        raise NativeFormError(
            f"the {parts.family} config builds {wrong[0]} as {tuple(expected[wrong[0]].shape)}, "
            f"the compacted model holds {tuple(state[wrong[0]].shape)}"
        )
    native.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False, assign=True)
    copy_meta_buffers(model, native)  # rotary frequencies and other computed buffers
    native.tie_weights()
    unset = [name for name, p in list(native.named_parameters()) + list(native.named_buffers()) if p.is_meta]
    if unset:
        raise NativeFormError(f"the {parts.family} model leaves {', '.join(unset[:3])} unset")
    native.generation_config = model.generation_config
    return native.eval()


def check_same_outputs(reference: PreTrainedModel, candidate: PreTrainedModel, family: str) -> None:
    """Logits of both models on random tokens, whole and token by token through the cache, must agree.

    Tolerance: 1e-4 of the largest logit (float32; zero padding only reorders sums), 3e-2 in half precision.
    """
    vocab = reference.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(reference.device)
    rtol = 1e-4 if reference.dtype == torch.float32 else 3e-2
    with torch.no_grad():
        want = reference(ids).logits.float()
        got = candidate(ids).logits.float()
        prefix = candidate(ids[:, :5], use_cache=True)
        step = candidate(ids[:, 5:], cache=prefix.cache, use_cache=True).logits.float()
    scale = want.abs().max().item() or 1.0
    for name, a, b in (("logits", got, want), ("cached logits", step, want[:, 5:])):
        error = (a - b).abs().max().item()
        if error > rtol * scale:
            raise NativeFormError(f"the {family} model's {name} differ from the compacted model's by {error:.3g}")


def to_native(model: PreTrainedModel, pad: bool = False, grouping: str = "pad") -> tuple[PreTrainedModel, list[str]]:
    """The family's own model equal to ``model`` and what was padded (``pad``); ``NativeFormError`` if none is."""
    try:
        parts = model_parts(model)  # a derived family is read again off the compacted model's modules
        if parts.declaration.attention is None:
            raise NativeFormError(
                f"the {parts.family} model is pruned in its MLPs only; per-layer widths need modeling_gisp_pruned.py"
            )
        layers = [_native_layer(layer, parts.declaration) for layer in parts.layers]
    except ValueError as err:
        raise NativeFormError(str(err)) from None
    notes: list[str] = []
    evened = []
    for index, layer in enumerate(layers):
        attention = even_groups(layer.attention, grouping)
        if attention.n_head != layer.attention.n_head or attention.n_kv != layer.attention.n_kv:
            if not pad:
                raise NativeFormError(f"layer {index} has uneven key/value groups; per-layer shapes need modeling_gisp_pruned.py")
            notes.append(f"layer {index}: uneven groups {layer.attention.n_head}/{layer.attention.n_kv} made even")
        evened.append(EngineLayer(attention, layer.mlp, layer.others))
    shape = _uniform_shape(evened, pad)
    if pad:
        shape = _shape_the_config_accepts(model, parts, shape)
    state = {}
    for index, layer in enumerate(evened):
        att = layer.attention
        if (att.n_head, att.n_kv) != (shape.n_head, shape.n_kv):
            notes.append(f"layer {index}: {att.n_head}/{att.n_kv} -> {shape.n_head}/{shape.n_kv} heads")
            att = pad_heads(att, shape.n_head, shape.n_kv)
        if layer.mlp.width != shape.width:
            notes.append(f"layer {index}: {layer.mlp.width} -> {shape.width} MLP channels")
        padded = EngineLayer(att, pad_mlp(layer.mlp, shape.width), layer.others)
        for path, tensor in _layer_state(padded, parts.declaration).items():
            state[f"{parts.layers_path}.{index}.{path}"] = tensor
    state.update(parts.outside_layers(model))
    native = _build(model, parts, shape, state)
    check_same_outputs(model, native, parts.family)
    return native, notes


def saved_form(compact: PreTrainedModel) -> tuple[PreTrainedModel, dict[str, str]]:
    """What ``gisp prune`` saves: the family's own model when it holds the compacted one exactly (no padding),
    else the compacted model with its modelling file; and which form it is and why (for ``pruning.json``)."""
    try:
        native, _ = to_native(compact, pad=False)
    except NativeFormError as err:
        return compact, {"form": "gisp-pruned", "why": f"{err} (loads with trust_remote_code=True)"}
    why = "every layer has one shape, which the family's own config holds: loads with trust_remote_code=False"
    return native, {"form": "native", "why": why}
