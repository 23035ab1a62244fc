"""Physical compaction of Llama-like decoders: cut every sliced tensor down to the kept units.

The result is a ``GispPruned*ForCausalLM`` (see ``modeling_gisp_pruned``): the family's own model with
each layer's projections resized, so it is really smaller and faster and gives the same outputs as the
masked model it came from. What is cut follows from the anatomy alone; the declaration only says where
the attention module is, whose head counts the family reads at run time.

A layer removed as a whole (kind ``"layer"``) is left out: the remaining layers are renumbered (their
``layer_idx``, hence the key/value cache slots) and the config's per-layer fields follow them
(``config_without_layers``), so the compacted model is the family's own model with fewer layers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from gisp_plugin.anatomy.decoder import DecoderDeclaration
from gisp_plugin.anatomy.structures import KeepMask, LayerAnatomy, StructureKind, TensorSlice
from gisp_plugin.compaction.hidden import compact_hidden, without_hidden
from gisp_plugin.compaction.modeling_gisp_pruned import pruned_classes
from gisp_plugin.compaction.slicing import Cut, cut_stacked, cut_tensor, gathered_rows
from gisp_plugin.masking.masked_model import check_no_bias_in_removed_layers
from gisp_plugin.masking.routing import router_attributes
from gisp_plugin.masking.sparsifier import dense_tensor

REMOTE_MODULE = "modeling_gisp_pruned"


def dense_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``module``, unmasked, by its path (masks left out)."""
    state: dict[str, torch.Tensor] = {}
    for path, sub in module.named_modules():
        if "parametrizations" in path.split("."):
            continue
        names = list(sub._parameters) + (list(sub.parametrizations.keys()) if parametrize.is_parametrized(sub) else [])
        names += [n for n in sub._buffers if n not in sub._non_persistent_buffers_set]
        for name in names:
            tensor = dense_tensor(sub, name)
            if tensor is not None:
                state[f"{path}.{name}" if path else name] = tensor
    return state


def _cuts(layer: LayerAnatomy, keep: KeepMask, pad_to: int) -> dict[str, list[Cut]]:
    """The cuts of every sliced tensor of one layer, by tensor path.

    With ``pad_to`` > 1 the kept channels of each MLP, shared expert and routed expert are rounded up
    with zero channels: GPU matrix kernels lose much of their speed on widths that are not multiples of
    8 (better 64), and a channel whose down-projection column is zero adds exactly nothing.
    """
    cuts: dict[str, list[Cut]] = {}
    for name, kind in layer.kinds.items():
        flags = keep[layer.index, name]
        kind_pad = pad_to if kind.block != "attention" else 1
        for tensor_slice in kind.owned:
            cuts.setdefault(tensor_slice.path, []).append(Cut(tensor_slice, flags, kind_pad))
        for dep in kind.dependents:
            cuts.setdefault(dep.slice.path, []).append(Cut(dep.slice, dep.alive(flags)))
    return cuts


def _heads(kind: StructureKind, flags: torch.Tensor) -> tuple[int, int, bool]:
    """Kept query heads, surviving key/value heads, and whether they split into equal groups."""
    n_heads = int(flags.sum())
    if not kind.dependents:
        return n_heads, n_heads, True
    readers = kind.dependents[0].readers
    per_kv = [int(flags[list(r)].sum()) for r in readers]
    alive = [n for n in per_kv if n]
    return n_heads, len(alive), len(set(alive)) <= 1


def _attention(
    layer: LayerAnatomy, keep: KeepMask, cuts: dict[str, list[Cut]], names
) -> tuple[dict | None, dict[str, list[int]]]:
    """The attention spec (head counts the family reads at run time) and the rows to repeat, by module.

    Under uneven groups each query head gets its own copy of its key/value head (``gathered_rows``).
    """
    kind = next((kind for kind in layer.kinds.values() if kind.block == "attention"), None)
    if kind is None:  # a model pruned in its MLPs only: the attention (or other mixer) is the family's, whole
        return None, {}
    flags = keep[layer.index, kind.name]
    n_heads, n_kv, even = _heads(kind, flags)
    gathers: dict[str, list[int]] = {}
    if not even:
        readers_of: dict[TensorSlice, tuple] = {dep.slice: dep.readers for dep in kind.dependents}
        for dep in kind.dependents:
            if not dep.slice.is_bias:
                gathers[dep.slice.module_path] = gathered_rows(cuts[dep.slice.path], readers_of, flags)
        n_kv = n_heads
    spec = {
        "module": names.module,
        "output_projection": names.o,
        "num_heads": n_heads,
        "num_key_value_heads": n_kv,
        "num_key_value_groups": n_heads // n_kv if n_kv else 1,
    }
    return spec, gathers


def _experts(
    layer_module: nn.Module, layer: LayerAnatomy, keep: KeepMask, cuts: dict[str, list[Cut]], state: dict
) -> dict[str, dict]:
    """Cut routed experts into a list of experts of their own widths, and the router to the live experts.

    Stacked ``[E, ...]`` tensors cannot hold experts of different widths; the compacted layer keeps one
    small MLP per live expert (``RaggedExperts``), numbered in the order of the router's remaining rows.
    """
    modules: dict[str, dict] = {}
    for name, kind in layer.kinds.items():
        rows = kind.router_rows
        if rows is None:
            continue
        flags = keep[layer.index, name]
        live = rows.alive(flags).nonzero().flatten().tolist()
        stacked = {s.path for s in kind.owned if s.stacked}
        experts_path = {path.rsplit(".", 1)[0] for path in stacked}.pop()
        down = next(s.path for s in kind.owned if s.stacked and s.axis == 2)  # [E, H, I]: the input columns
        widths = []
        for path in sorted(stacked):
            pieces = cut_stacked(state.pop(path), cuts.pop(path), live)
            tensor_name = path.rsplit(".", 1)[1]
            for j, piece in enumerate(pieces):
                state[f"{experts_path}.{j}.{tensor_name}.weight"] = piece
            if path == down:
                widths = [piece.shape[1] for piece in pieces]
        hidden = state[rows.slice.path].shape[1]
        modules[experts_path] = {"type": "ragged_experts", "hidden_size": hidden, "widths": widths}
        modules.update(_router_specs(layer_module, kind, cuts, state, len(live)))
    return modules


def _router_specs(
    layer_module: nn.Module, kind: StructureKind, cuts: dict[str, list[Cut]], state: dict, live: int
) -> dict[str, dict]:
    """The router (and a module around it holding per-expert tensors) with one entry per live expert.

    Each module's parameters and buffers shrink to the cut shapes; the router's expert count and top-k
    follow the live experts, and a router left without any routes no token (``no_experts``).
    """
    modules: dict[str, dict] = {}
    for dep in kind.router_tensors:
        path = dep.slice.path
        state[path] = cut_tensor(state[path], cuts.pop(path))
        owner = layer_module.get_submodule(dep.slice.module_path)
        spec = modules.setdefault(dep.slice.module_path, {"type": "parameters", "shapes": {}, "buffers": {}, "attributes": {}})
        group = "shapes" if isinstance(dense_tensor(owner, dep.slice.tensor_name), nn.Parameter) else "buffers"
        spec[group][dep.slice.tensor_name] = list(state[path].shape)
    router = modules.setdefault(kind.router, {"type": "parameters", "shapes": {}, "buffers": {}, "attributes": {}})
    router["attributes"] = router_attributes(layer_module.get_submodule(kind.router), live)
    router["no_experts"] = live == 0
    return modules


def compact_layer(
    layer_module: nn.Module,
    layer: LayerAnatomy,
    keep: KeepMask,
    declaration: DecoderDeclaration,
    extra: dict[str, torch.Tensor],
    pad_to: int,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The pruned-layer spec (see ``modeling_gisp_pruned``) and the layer's tensors (keys relative to it)."""
    state = dense_state(layer_module)
    cuts = _cuts(layer, keep, pad_to)
    attention, gathers = _attention(layer, keep, cuts, declaration.attention)
    modules = _experts(layer_module, layer, keep, cuts, state)
    for path, tensor_cuts in cuts.items():
        state[path] = cut_tensor(state[path], tensor_cuts)

    for module_path, bias in extra.items():
        if f"{module_path}.weight" not in state:
            raise ValueError(f"an extra bias names {layer.prefix}.{module_path}, which is not a projection of this layer")
        weight = state[f"{module_path}.weight"]
        dense_bias = state.get(f"{module_path}.bias")
        bias = bias.detach().to(device=weight.device, dtype=weight.dtype)
        state[f"{module_path}.bias"] = bias.clone() if dense_bias is None else dense_bias + bias

    names = declaration.attention
    norms = {f"{names.module}.{norm}" for norm in names.projection_norms or ()} if names is not None else set()
    norm_gathers = _gathers_after_norms(layer, names, gathers) if norms and gathers else {}
    for module_path in sorted({path.rsplit(".", 1)[0] for path in cuts} | set(extra)):
        if module_path in modules:
            continue
        module = layer_module.get_submodule(module_path)
        if module_path in norms:
            modules[module_path] = {
                "type": "projection_norm",
                "features": state[f"{module_path}.weight"].shape[0],
                "dense_features": dense_tensor(module, "weight").shape[0],
                "eps": getattr(module, "variance_epsilon", getattr(module, "eps", None)),
                "gather": norm_gathers.get(module_path),
            }
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{layer.prefix}.{module_path} is not a linear layer; only linear projections can be cut")
        weight = state[f"{module_path}.weight"]
        modules[module_path] = {
            "type": "linear",
            "in_features": weight.shape[1],
            "out_features": weight.shape[0],
            "bias": f"{module_path}.bias" in state,
            "gather": gathers.get(module_path),
        }
    spec = {"modules": modules, "attention": attention}
    return spec, {key: value.detach().clone() for key, value in state.items()}


def _gathers_after_norms(layer: LayerAnatomy, names, gathers: dict[str, list[int]]) -> dict[str, list[int]]:
    """Under uneven groups, the key rows are repeated after the norm over the whole key projection, not before.

    OLMo 2's ``k_norm`` divides by the root mean square of the whole key projection: over the repeated rows it
    would count a key/value head once per query head reading it. The compacted ``k_proj`` keeps each surviving
    key/value head once, and its norm (``ProjectionRMSNorm``, with the dense width as divisor) repeats the
    normalised rows, so it computes what the masked norm does over the zeroed heads. ``gathers`` loses the key
    projection's entry; the result names the norm's.
    """
    if names.qkv is not None:
        raise ValueError(f"{layer.prefix}: uneven key/value groups under a norm over a fused {names.qkv} are not supported")
    key = f"{names.module}.{names.k}"
    return {f"{names.module}.{names.projection_norms[1]}": gathers.pop(key)}


def config_without_layers(config, kept: list[int], declaration: DecoderDeclaration | None = None) -> dict:
    """The fields (``to_dict``) of ``config`` for a model holding only the decoder layers ``kept``, renumbered.

    ``num_hidden_layers`` shrinks; per-layer lists (``layer_types``: the sliding/full attention pattern of
    Gemma 2/3, Qwen, Mistral) keep the entries of the kept layers; where the declaration names the config
    fields that pick the layers holding routed experts by index (Qwen-MoE's ``mlp_only_layers`` and
    ``decoder_sparse_step``, ``ExpertNames``), the dense layers are listed by their new indices, so every
    kept layer is built as it was.
    """
    values = config.to_dict()
    dense = values["num_hidden_layers"]
    if kept == list(range(dense)):
        return values
    if isinstance(values.get("layer_types"), list):
        if len(values["layer_types"]) != dense:
            raise ValueError(f"config lists {len(values['layer_types'])} layer types for {dense} layers")
        values["layer_types"] = [values["layer_types"][i] for i in kept]
    experts = declaration.experts if declaration is not None else None
    if experts is not None and experts.dense_layers_field in values:
        values[experts.dense_layers_field] = [new for new, old in enumerate(kept) if not experts.holds_experts(config, old)]
        if experts.sparse_step_field in values:
            values[experts.sparse_step_field] = 1
    values["num_hidden_layers"] = len(kept)
    return values


def pruned_config(
    dense_config, specs: list[dict], removed_layers: list[int] | None = None, declaration: DecoderDeclaration | None = None
):
    """The config of the compacted model: the dense one plus per-layer shapes and remote-code pointers.

    ``specs`` describe the kept layers in order; ``removed_layers`` are the dense indices of the layers
    removed as a whole (recorded as ``config.removed_layers``); ``declaration`` says which config fields
    place routed experts by layer index.
    """
    family = dense_config.model_type
    config_cls, model_cls = pruned_classes(family)
    removed = sorted(removed_layers or [])
    kept = [i for i in range(dense_config.num_hidden_layers) if i not in removed]
    values = config_without_layers(dense_config, kept, declaration)
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "pruned_layers", "removed_layers"):
        values.pop(key, None)
    config = config_cls(**values, pruned_layers=specs, pruning_base_model_type=family, removed_layers=removed)
    config.architectures = [model_cls.__name__]
    config.auto_map = {
        "AutoConfig": f"{REMOTE_MODULE}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{REMOTE_MODULE}.{model_cls.__name__}",
    }
    config._attn_implementation = dense_config._attn_implementation
    return config


def compact_decoder(
    model: PreTrainedModel,
    keep: KeepMask,
    anatomy,
    declaration: DecoderDeclaration,
    extra_biases: dict[str, torch.Tensor] | None = None,
    pad_to: int = 1,
) -> PreTrainedModel:
    """A new, physically smaller model equal in outputs to ``model`` masked by ``keep``.

    ``extra_biases`` maps a module path (``model.layers.3.self_attn.o_proj``) to a bias a method adds to
    that projection's output (FLAP's bias compensation); it is folded into the compacted layer.
    ``pad_to`` > 1 rounds each layer's MLP width up with zero channels (same outputs, GPU-friendly shapes).
    Layers removed as a whole are left out and the rest renumbered; removing every layer is refused.
    Removed hidden channels are cut first (``compaction.hidden``); with nothing else removed, the result is
    the family's own model class with a smaller ``hidden_size``.
    """
    extra = extra_biases or {}
    if keep.hidden_pruned():
        if extra:
            raise ValueError("extra output biases with removed hidden channels are not supported; prune one or the other")
        model, keep = compact_hidden(model, anatomy, keep), without_hidden(keep)
        if all(bool(flags.all()) for flags in keep.flags.values()):
            return model
    specs, state = [], {}
    for new_index, layer in enumerate(kept_layers(anatomy, keep, extra)):
        spec, tensors = compact_layer(
            model.get_submodule(layer.prefix), layer, keep, declaration, layer_extras(extra, layer.prefix), pad_to
        )
        specs.append(spec)
        state.update({f"{declaration.layers}.{new_index}.{key}": value for key, value in tensors.items()})
    for key, value in model.state_dict().items():
        if not key.startswith(f"{declaration.layers}."):
            state[key] = value.detach().clone()
    return assemble_compacted(model, specs, state, keep.removed_layers(), declaration)


def kept_layers(anatomy, keep: KeepMask, extra_biases: dict[str, torch.Tensor]) -> list[LayerAnatomy]:
    """The layers a compacted model holds, in order (their new index is their place in the list).

    Removing every layer, or adding a bias inside a removed one, is refused.
    """
    check_no_bias_in_removed_layers(anatomy, keep, extra_biases)
    kept = [layer for layer in anatomy.layers if keep.layer_kept(layer.index)]
    if not kept:
        raise ValueError(f"every one of the {len(anatomy.layers)} decoder layers is removed; a model needs at least one")
    return kept


def layer_extras(extra_biases: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The extra biases of one layer, keyed relative to it (``model.layers.3.mlp.down_proj`` -> ``mlp.down_proj``)."""
    prefix = f"{prefix}."
    return {path[len(prefix) :]: bias for path, bias in extra_biases.items() if path.startswith(prefix)}


def assemble_compacted(
    model: PreTrainedModel,
    specs: list[dict],
    state: dict[str, torch.Tensor],
    removed_layers: list[int] | None = None,
    declaration: DecoderDeclaration | None = None,
) -> PreTrainedModel:
    """The pruned model of per-layer ``specs`` and its full ``state`` (cut layers plus the untouched tensors);
    ``removed_layers`` are the dense indices of layers removed as a whole (the others renumbered in ``state``),
    ``declaration`` the family's (it says how the config places routed experts).

    ``model`` gives the dense config, the generation config and the non-persistent buffers (rotary
    frequencies); its weights are not read.
    """
    config = pruned_config(model.config, specs, removed_layers, declaration)
    _, model_cls = pruned_classes(model.config.model_type)
    with torch.device("meta"):
        compact = model_cls(config)
    unexpected = compact.load_state_dict(state, strict=False, assign=True).unexpected_keys
    if unexpected:  # a rebuilt layer lacks a module the cut one has (say, experts where the config now builds a dense MLP)
        raise RuntimeError(f"the compacted {model.config.model_type} model has no place for {unexpected[:3]}")
    copy_meta_buffers(model, compact)
    compact.tie_weights()
    missing = [name for name, p in list(compact.named_parameters()) + list(compact.named_buffers()) if p.is_meta]
    if missing:
        raise RuntimeError(f"compaction left tensors unset: {missing[:5]}")
    compact.generation_config = model.generation_config
    compact.eval()
    return compact


def copy_meta_buffers(source: nn.Module, target: nn.Module) -> None:
    """Carry non-persistent buffers (rotary frequencies) that a meta-built model lacks."""
    source_buffers = dict(source.named_buffers())
    for name, buffer in list(target.named_buffers()):
        if buffer.is_meta and name in source_buffers:
            owner_path, _, attr = name.rpartition(".")
            owner = target.get_submodule(owner_path)
            owner._buffers[attr] = source_buffers[name].clone()
