"""The adapter of a family nobody declared, read off its decoder layers' modules.

transformers ships dozens of decoder-only families built from the same attention + MLP pattern, and new
ones arrive monthly; a list of model types cannot keep up. ``derive_declaration`` reads a model's layers
and writes the ``DecoderDeclaration`` a built-in adapter would write by hand: attention projections
separate or fused, per-head norms (shared, kept whole) or norms over a whole query/key projection (cut
with the heads), gated, fused or plain MLPs, routed experts stacked as transformers 5 stacks them, with
their router and an optional shared expert. Everything else the family does (multipliers, layers without
rotary embeddings, extra norms around the blocks) stays in its own modules, which the pruned model reuses.

What the pattern does not cover is refused in one line that names it: multi-head latent attention
(DeepSeek-V3), layers with linear attention or state-space mixers (Qwen3-Next, Zamba2, Falcon-H1),
cross-attention, a projection or parameter the pattern does not place. A derived declaration is then
proved on a small copy of the model before any pruning (``adapters.self_check``).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from gisp_plugin.adapters.adapter import ArchitectureAdapter, UnsupportedArchitectureError, decoder_adapter, model_family
from gisp_plugin.anatomy.decoder import AttentionNames, DecoderDeclaration, ExpertNames, MLPNames
from gisp_plugin.compaction.modeling_gisp_pruned import pruned_classes
from gisp_plugin.masking.sparsifier import dense_tensor

LAYERS = "model.layers"
ATTENTION_MODULES = ("self_attn", "attention", "attn")
SEPARATE_QKV = (("q_proj", "k_proj", "v_proj"),)
FUSED_QKV = ("qkv_proj", "query_key_value", "Wqkv", "c_attn")
OUTPUT_PROJECTIONS = ("o_proj", "dense", "out_proj", "c_proj")
LATENT_ATTENTION = ("q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj", "kv_proj")
MLP_MODULES = ("mlp", "feed_forward", "ffn")
# (gate, up, down) of gated MLPs, (gate_up, down) of fused ones, (up, down) of plain ones
GATED = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
FUSED_GATED = (("gate_up_proj", "down_proj"),)
PLAIN = (("up_proj", "down_proj"), ("c_fc", "c_proj"), ("fc1", "fc2"), ("dense_h_to_4h", "dense_4h_to_h"))
ROUTERS = ("gate", "router")
SHARED_EXPERTS = ("shared_expert", "shared_experts", "shared_mlp")
CROSS_ATTENTION = ("encoder_attn", "cross_attn", "crossattention")


def _refuse(model_type: str, what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"model type {model_type!r} does not follow the attention + MLP pattern: {what}; "
        "add an adapter plugin for it (docs/families.md)"
    )


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: child for name, child in module.named_children() if isinstance(child, nn.Linear)}


def _own_parameters(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The module's own parameters (not its children's), by name, with their shapes; a parameter wearing a
    pruning mask counts as itself (the anatomy may be read while a method's masks are on)."""
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters(recurse=False)}
    if parametrize.is_parametrized(module):
        shapes.update({name: tuple(dense_tensor(module, name).shape) for name in module.parametrizations})
    return shapes


def _with_parameters(module: nn.Module, skip: set[str]) -> list[str]:
    """Children (outside ``skip``, masks aside) holding parameters other than scalars (a learned activation's)."""
    return [
        name
        for name, child in module.named_children()
        if name not in skip and name != "parametrizations" and any(p.numel() > 1 for p in child.parameters())
    ]


def _attention(layer: nn.Module, where: str, fail) -> AttentionNames:
    children = dict(layer.named_children())
    cross = [name for name in CROSS_ATTENTION if name in children]
    if cross:
        raise fail(f"{where}.{cross[0]} is cross-attention, which the pattern does not cover")
    module = next((name for name in ATTENTION_MODULES if name in children), None)
    if module is None:
        mixers = _with_parameters(layer, set())
        raise fail(f"{where} has no softmax attention module ({', '.join(ATTENTION_MODULES)}); it holds {', '.join(mixers)}")
    attn = children[module]
    linears = _linears(attn)
    latent = [name for name in LATENT_ATTENTION if name in linears]
    if latent:
        raise fail(f"{where}.{module} is multi-head latent attention ({', '.join(latent)}): heads share compressed projections")
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int):
        raise fail(f"{where}.{module} sets no integer head_dim")
    names: dict = {"module": module}
    separate = next((qkv for qkv in SEPARATE_QKV if all(name in linears for name in qkv)), None)
    fused = next((name for name in FUSED_QKV if name in linears), None)
    if separate is not None:
        names.update(q=separate[0], k=separate[1], v=separate[2])
        used = set(separate)
    elif fused is not None:
        names["qkv"], used = fused, {fused}
    else:
        raise fail(f"{where}.{module} has no q/k/v projections ({', '.join(sorted(linears)) or 'no linear layers'})")
    output = next((name for name in OUTPUT_PROJECTIONS if name in linears and name not in used), None)
    if output is None:
        raise fail(f"{where}.{module} has no output projection ({', '.join(OUTPUT_PROJECTIONS)})")
    names["o"] = output
    used.add(output)
    extra = sorted(set(linears) - used)
    if extra:
        raise fail(f"{where}.{module}.{extra[0]} is a projection the pattern does not place (gated or extra attention)")
    own = _own_parameters(attn)
    if own:
        name, shape = next(iter(own.items()))
        raise fail(f"{where}.{module}.{name} {list(shape)} is a parameter of the attention the pattern does not place")
    norms = _projection_norms(attn, used, head_dim, linears[output].in_features, where, module, fail)
    if norms is not None:
        names["projection_norms"] = norms
    return AttentionNames(**names)


def _projection_norms(attn, used, head_dim, query_width, where, module, fail) -> tuple[str, str] | None:
    """The names of norms over the whole query and key projections, if any; per-head norms need no name."""
    whole = {}
    for name, child in attn.named_children():
        if name in used or not any(True for _ in child.parameters()):
            continue
        params = _own_parameters(child)
        shapes = ", ".join(f"{key} {list(shape)}" for key, shape in params.items())
        if set(params) - {"bias"} != {"weight"} or len(params["weight"]) != 1 or _with_parameters(child, set()):
            raise fail(f"{where}.{module}.{name} ({shapes}) is neither a per-head norm nor a norm over a whole projection")
        width = params["weight"][0]
        per_head = width == head_dim and not hasattr(child, "dense_features")  # a cut projection norm may be one head wide
        if per_head and all(shape == (head_dim,) for shape in params.values()):
            continue  # one norm over each head's features, shared by all heads: it stays whole
        if "bias" in params:
            raise fail(f"{where}.{module}.{name} ({shapes}) is a norm with a bias over a whole projection")
        whole[name] = width
    if not whole:
        return None
    query = next((name for name in whole if name.startswith("q")), None)
    key = next((name for name in whole if name.startswith("k")), None)
    if len(whole) != 2 or query is None or key is None or whole[query] != query_width:
        found = ", ".join(f"{name} [{width}]" for name, width in whole.items())
        raise fail(f"{where}.{module} has norms ({found}) that are neither per head ({head_dim}) nor over the q/k projections")
    return query, key


def _mlp_names(mlp: nn.Module, where: str, fail, allowed_extra: tuple[str, ...] = ()) -> MLPNames:
    """The names of a dense MLP's projections (gated, fused gated or plain)."""
    linears = _linears(mlp)
    names: MLPNames | None = None
    for gate, up, down in GATED:
        if {gate, up, down} <= set(linears):
            names = MLPNames(gate=gate, up=up, down=down)
            break
    if names is None:
        for gate_up, down in FUSED_GATED:
            if {gate_up, down} <= set(linears):
                names = MLPNames(gate_up=gate_up, down=down)
                break
    if names is None:
        for up, down in PLAIN:
            if {up, down} <= set(linears):
                names = MLPNames(gate=None, up=up, down=down)
                break
    if names is None:
        raise fail(f"{where} has no MLP projections it can read ({', '.join(sorted(linears)) or 'no linear layers'})")
    used = set(names.projections) | set(allowed_extra)
    extra = sorted(set(_with_parameters(mlp, used)) | set(_own_parameters(mlp)))
    if extra:
        raise fail(f"{where}.{extra[0]} is a part of the MLP the pattern does not place")
    return names


def _experts(mlp: nn.Module, module: str, where: str, fail) -> ExpertNames:
    """The names of a mixture-of-experts block: stacked experts, their router, an optional shared expert."""
    children = dict(mlp.named_children())
    experts = children["experts"]
    stacked = _own_parameters(experts)
    gate_up, down = stacked.get("gate_up_proj", ()), stacked.get("down_proj", ())
    if (
        set(stacked) != {"gate_up_proj", "down_proj"}
        or len(gate_up) != 3
        or len(down) != 3
        or gate_up != (down[0], 2 * down[2], down[1])
        or _with_parameters(experts, set())
    ):
        found = ", ".join(f"{name} {list(shape)}" for name, shape in stacked.items()) or "one module per expert"
        raise fail(f"{where}.experts holds {found}, not the stacked gate_up_proj [E, 2I, H] and down_proj [E, H, I]")
    n_experts, hidden, _ = down
    weights = {name: _router_weight(children[name], n_experts, hidden) for name in ROUTERS if name in children}
    router = next((name for name, weight in weights.items() if weight), None)
    router_weight = weights.get(router)
    if router is None:
        raise fail(f"{where} has no router ({', '.join(ROUTERS)}) with a weight [{n_experts}, {hidden}]")
    router_tensors = []
    for name, shape in _tensor_shapes(children[router]).items():
        if name == router_weight:
            continue
        if not _per_expert(shape, n_experts):
            raise fail(f"{where}.{router}.{name} {list(shape)} is a part of the router the pattern does not place")
        router_tensors.append(f"{router}.{name}")  # a score-correction bias: one entry per expert
    block_tensors = {**_own_parameters(mlp), **{name: tuple(b.shape) for name, b in mlp.named_buffers(recurse=False)}}
    router_tensors += [name for name, shape in block_tensors.items() if _per_expert(shape, n_experts)]
    shared = next((name for name in SHARED_EXPERTS if name in children), None)
    shared_mlp = _mlp_names(children[shared], f"{where}.{shared}", fail) if shared else MLPNames()
    gates = [name for name, child in _linears(mlp).items() if name.endswith("_gate") and child.out_features == 1]
    placed = {"experts", router, *([shared] if shared else []), *gates}
    extra = sorted(set(_with_parameters(mlp, placed)) | (set(_own_parameters(mlp)) - set(router_tensors)))
    if extra:
        raise fail(f"{where}.{extra[0]} is a part of the mixture of experts the pattern does not place")
    return ExpertNames(
        module=module,
        router=router,
        router_weight=router_weight,
        router_tensors=tuple(router_tensors),
        shared=shared,
        shared_mlp=shared_mlp,
    )


def _router_weight(router: nn.Module, n_experts: int, hidden: int) -> str | None:
    """Where a router keeps its weight ``[E, H]``: its own ``weight``, or that of a linear child (Hunyuan's ``wg``)."""
    if _own_parameters(router).get("weight") == (n_experts, hidden):
        return "weight"
    linears = [name for name, child in _linears(router).items() if _own_parameters(child) == {"weight": (n_experts, hidden)}]
    return f"{linears[0]}.weight" if len(linears) == 1 else None


def _tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter and buffer under ``module`` by its path, with its shape (masks aside)."""
    shapes = {}
    for path, sub in module.named_modules():
        if "parametrizations" in path.split("."):
            continue
        own = {**_own_parameters(sub), **{name: tuple(b.shape) for name, b in sub.named_buffers(recurse=False)}}
        shapes.update({f"{path}.{name}" if path else name: shape for name, shape in own.items()})
    return shapes


def _per_expert(shape: tuple[int, ...], n_experts: int) -> bool:
    """A tensor holding one entry per expert, ``[E]`` or ``[1, E]``."""
    return shape in ((n_experts,), (1, n_experts))


def _layer(layer: nn.Module, index: int, fail) -> tuple[AttentionNames, MLPNames | None, ExpertNames | None]:
    """What one decoder layer declares: its attention, and its dense MLP or its experts."""
    where = f"{LAYERS}.{index}"
    attention = _attention(layer, where, fail)
    children = dict(layer.named_children())
    module = next((name for name in MLP_MODULES if name in children), None)
    if module is None:
        raise fail(f"{where} has no MLP module ({', '.join(MLP_MODULES)})")
    mlp = children[module]
    if "experts" in dict(mlp.named_children()):
        dense, experts = None, _experts(mlp, module, f"{where}.{module}", fail)
    else:
        dense, experts = _mlp_names(mlp, f"{where}.{module}", fail), None
    if dense is not None:
        dense = MLPNames(module=module, gate=dense.gate, up=dense.up, down=dense.down, gate_up=dense.gate_up)
    hidden = layer.get_submodule(f"{attention.module}.{attention.o}").out_features
    for name in _with_parameters(layer, {attention.module, module}):
        shapes = {tuple(p.shape) for p in layer.get_submodule(name).parameters()}
        if any(shape != (hidden,) for shape in shapes):
            raise fail(f"{where}.{name} ({', '.join(str(list(s)) for s in sorted(shapes))}) is neither a norm nor a block")
    for name, shape in _own_parameters(layer).items():
        if shape not in ((), (1,), (hidden,)):
            raise fail(f"{where}.{name} {list(shape)} is a parameter of the layer the pattern does not place")
    return attention, dense, experts


def derive_declaration(model: PreTrainedModel) -> DecoderDeclaration:
    """The declaration of a model's decoder layers, read off its modules, or one line saying what is missing."""
    model_type = model_family(model)  # a compacted model is read as its dense family

    def fail(what: str) -> UnsupportedArchitectureError:
        return _refuse(model_type, what)

    try:
        pruned_classes(model_type)
    except KeyError:
        raise fail("transformers has no causal language model class for it") from None
    try:
        layers = model.get_submodule(LAYERS)
    except AttributeError:
        children = ", ".join(name for name, _ in model.named_children())
        raise fail(f"it keeps no decoder layers at {LAYERS} (it holds {children})") from None
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise fail(f"{LAYERS} is not a list of decoder layers")
    try:
        read = [_layer(layer, index, fail) for index, layer in enumerate(layers)]
    except UnsupportedArchitectureError as refusal:
        mixers = _hybrid_mixers(layers)
        if not mixers:
            raise
        return _mlps_only(layers, mixers, fail) or _raise(refusal)
    attention = {names[0] for names in read}
    if len(attention) != 1:
        raise fail(f"its layers place attention differently ({' vs '.join(sorted(str(a) for a in attention))})")
    dense = {names[1] for names in read if names[1] is not None}
    experts = {names[2] for names in read if names[2] is not None}
    if len(dense) > 1 or len(experts) > 1:
        raise fail("its layers place their MLPs differently")
    return DecoderDeclaration(attention.pop(), dense.pop() if dense else MLPNames(), experts.pop() if experts else None, LAYERS)


def _raise(error: Exception):
    raise error


def _hybrid_mixers(layers: nn.ModuleList) -> list[str]:
    """The token mixers other than softmax attention a hybrid's layers hold (``linear_attn``, ``mamba``), if any.

    A child with parameters that is neither a norm (one weight of the hidden width), the attention nor the MLP
    module is a mixer; a layer without an attention module has one by construction.
    """
    mixers = {}
    for layer in layers:
        children = dict(layer.named_children())
        placed = {name for name in (*ATTENTION_MODULES, *MLP_MODULES) if name in children}
        for name in _with_parameters(layer, placed):
            if any(p.dim() > 1 for p in children[name].parameters()):
                mixers[name] = True
    return list(mixers)


def _mlps_only(layers: nn.ModuleList, mixers: list[str], fail) -> DecoderDeclaration | None:
    """A hybrid's declaration pruned in part: its MLPs and experts, its mixers and attention left whole (or
    ``None`` when a layer has no MLP the pattern reads)."""
    read = []
    for index, layer in enumerate(layers):
        where = f"{LAYERS}.{index}"
        children = dict(layer.named_children())
        module = next((name for name in MLP_MODULES if name in children), None)
        if module is None:
            return None
        mlp = children[module]
        try:
            if "experts" in dict(mlp.named_children()):
                read.append((None, _experts(mlp, module, f"{where}.{module}", fail)))
            else:
                dense = _mlp_names(mlp, f"{where}.{module}", fail)
                read.append((MLPNames(module=module, gate=dense.gate, up=dense.up, down=dense.down, gate_up=dense.gate_up), None))
        except UnsupportedArchitectureError:
            return None
    dense = {names[0] for names in read if names[0] is not None}
    experts = {names[1] for names in read if names[1] is not None}
    if len(dense) > 1 or len(experts) > 1:
        return None
    why = f"its token mixers ({', '.join(mixers)}) and attention are kept whole; its MLPs and experts are pruned"
    return DecoderDeclaration(None, dense.pop() if dense else MLPNames(), experts.pop() if experts else None, LAYERS, why)


def _describe(declaration: DecoderDeclaration) -> str:
    a, m, e = declaration.attention, declaration.mlp, declaration.experts
    if a is None:
        mlp = "routed experts" if e is not None else f"{m.gate_up or '/'.join(n for n in (m.gate, m.up) if n)}/{m.down}"
        return f"pruned in part ({mlp}): {declaration.partial}"
    attention = a.qkv if a.qkv else "/".join((a.q, a.k, a.v))
    norms = f", {'/'.join(a.projection_norms)} over the projections" if a.projection_norms else ""
    mlp = "routed experts" + (f" + {e.shared}" if e.shared else "") if e is not None else ""
    dense = m.gate_up if m.gate_up else "/".join(name for name in (m.gate, m.up) if name) + ("" if m.gate else " (plain)")
    blocks = ", ".join(part for part in (f"{dense}/{m.down}" if e is None else "", mlp) if part)
    return f"attention {attention}/{a.o}{norms}; MLP {blocks}"


def derived_adapter(model: PreTrainedModel) -> ArchitectureAdapter:
    """The adapter of a family no plugin declares, from its derived declaration (refused in one line if none)."""
    model_type = model_family(model)  # a compacted model is read as its dense family
    declaration = derive_declaration(model)
    return decoder_adapter(model_type, f"derived from its modules: {_describe(declaration)}", (model_type,), declaration, True)
