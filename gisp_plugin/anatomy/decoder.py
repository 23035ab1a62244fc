"""Anatomy of Llama-like decoders, read off the live modules from a declaration of their names.

A family (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, ...) is declared by the names of its attention and
MLP projections, fused or separate; everything else (head_dim, head counts, widths, biases, what a unit
owns and how many parameters) is read from the real tensors, never from config fields a published
checkpoint may not set.

Units follow method.md: a query head owns its query rows (and bias rows) and its ``o_proj`` columns;
with plain multi-head attention it also owns its key/value rows. Under grouped-query attention the
key/value rows are *dependent*: they go only when every query head reading them is gone. An MLP channel
owns a row of the gate and up projections and a column of the down projection. Tensors no unit owns
(norms, including per-head ``q_norm``/``k_norm`` shared by all heads) are fixed parameters.

Every layer is also one unit of the ``"layer"`` kind (``whole_layer_kind``), owning all its parameters;
its slices are the output projections of its blocks, the only tensors that write into the residual stream.
The model-level hidden dimension is derived from the layer kinds and the live tensors (``anatomy.hidden``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from gisp_plugin.anatomy.hidden import hidden_dimension
from gisp_plugin.anatomy.structures import (
    WHOLE_LAYER,
    DependentSlice,
    LayerAnatomy,
    ModelAnatomy,
    StructureKind,
    TensorSlice,
)
from gisp_plugin.masking.sparsifier import dense_tensor

ATTN_HEAD = "attn_head"
MLP_CHANNEL = "mlp_channel"
EXPERT_CHANNEL = "expert_channel"
SHARED_CHANNEL = "shared_channel"


@dataclass(frozen=True)
class AttentionNames:
    """Where a family keeps its attention projections; ``qkv`` names one fused ``[q; k; v]`` projection.

    ``projection_norms`` names RMS norms over the whole query and key projections (OLMoE's ``q_norm``,
    ``k_norm``): their weights are cut with the heads, and the compacted norm keeps the dense width as
    its divisor, so it computes what the masked one does. Norms over one head's ``head_dim`` (Qwen3,
    Gemma 3) are shared by all heads and stay whole: they need no declaration.
    """

    module: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    projection_norms: tuple[str, str] | None = None


@dataclass(frozen=True)
class MLPNames:
    """Where a family keeps its MLP; ``gate_up`` names one fused ``[gate; up]`` projection.

    ``gate=None`` declares a plain (non-gated) MLP, ``down(act(up(x)))`` (StarCoder2's ``c_fc``/``c_proj``,
    ``fc1``/``fc2``, Nemotron's ReLU-squared ``up_proj``/``down_proj``): a channel owns its up row (and bias)
    and its down column.
    """

    module: str = "mlp"
    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    gate_up: str | None = None

    @property
    def projections(self) -> tuple[str, ...]:
        """The leaf names of the MLP's linear projections."""
        inputs = (self.gate_up,) if self.gate_up is not None else (self.gate, self.up)
        return tuple(name for name in (*inputs, self.down) if name is not None)


@dataclass(frozen=True)
class ExpertNames:
    """Where a family keeps its routed experts (transformers 5 stacks them in 3-D tensors).

    ``experts`` holds ``gate_up`` ``[E, 2I, H]`` and ``down`` ``[E, H, I]``; ``router`` has a weight
    ``[E, H]`` (at ``router_weight`` inside it: Hunyuan's router keeps it in a linear ``wg``);
    ``router_tensors`` are the other tensors that hold one entry per expert, paths relative to ``module``
    (GLM-4.5's ``gate.e_score_correction_bias`` ``[E]``, ERNIE 4.5's ``gate.moe_statics.e_score_correction_bias``
    ``[1, E]``, MiniMax-M2's ``e_score_correction_bias`` on the block itself): an expert owns its entry of each
    as it owns its router row, so a compacted router keeps the entries of the live experts only. ``shared`` names
    an always-on shared expert MLP (Qwen2-MoE), if the family has one, whose
    projections ``shared_mlp`` names. ``dense_layers_field`` and ``sparse_step_field`` name the config
    fields by which a family places its experts by layer index (Qwen-MoE's ``mlp_only_layers`` and
    ``decoder_sparse_step``): compaction rewrites them when whole layers are removed.
    """

    module: str = "mlp"
    experts: str = "experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    router: str = "gate"
    router_weight: str = "weight"
    router_tensors: tuple[str, ...] = ()
    shared: str | None = None
    shared_mlp: MLPNames = MLPNames()
    dense_layers_field: str | None = None
    sparse_step_field: str | None = None

    def holds_experts(self, config, index: int) -> bool:
        """Whether ``config`` builds layer ``index`` with routed experts, by the rule its two fields state
        (Qwen-MoE: layers listed in ``mlp_only_layers`` are dense, the others hold experts every
        ``decoder_sparse_step`` layers); without the fields, every layer does."""
        dense = getattr(config, self.dense_layers_field, None) if self.dense_layers_field else None
        step = (getattr(config, self.sparse_step_field, None) if self.sparse_step_field else None) or 1
        return index not in (dense or []) and (index + 1) % step == 0


@dataclass(frozen=True)
class DecoderDeclaration:
    """The module names of one Llama-like family: all the anatomy needs to know about it.

    With ``experts`` set, a layer whose MLP holds routed experts gets expert channels (and shared-expert
    channels) instead of dense MLP channels; other layers of the same model stay dense.

    ``attention=None`` declares a model pruned in part (a hybrid such as Qwen3-Next, Jamba, Bamba): only its
    MLPs and experts are structures; its token mixers (linear attention, state-space layers, attention) stay
    whole, and so do its layers and hidden dimension, which the mixers also read and write. ``partial`` says
    why, for the record.
    """

    attention: AttentionNames | None = AttentionNames()
    mlp: MLPNames = MLPNames()
    experts: ExpertNames | None = None
    layers: str = "model.layers"
    partial: str | None = None

    @property
    def projections(self) -> tuple[str, ...]:
        """The leaf names of every linear projection the declaration names (LoRA recovery adapts these)."""
        a = self.attention
        attention = () if a is None else (a.qkv,) if a.qkv is not None else (a.q, a.k, a.v)
        output = () if a is None else (a.o,)
        shared = self.experts.shared_mlp.projections if self.experts is not None and self.experts.shared else ()
        return tuple(dict.fromkeys((*attention, *output, *self.mlp.projections, *shared)))


@dataclass(frozen=True)
class _Projection:
    """One input projection's slice of rows for a run of units: which linear, from which row on."""

    linear: str
    offset: int


def _linear(layer: nn.Module, path: str) -> nn.Linear:
    return layer.get_submodule(path)


def _row_slices(layer: nn.Module, projection: _Projection, width: int) -> list[TensorSlice]:
    """The weight rows (and bias rows, if the projection has a bias) of a run of units."""
    slices = [TensorSlice(f"{projection.linear}.weight", 0, width, projection.offset)]
    if _tensor(layer, f"{projection.linear}.bias") is not None:  # the dense bias: a masked one may be sharded
        slices.append(TensorSlice(f"{projection.linear}.bias", 0, width, projection.offset))
    return slices


def _tensor(layer: nn.Module, path: str):
    module_path, _, name = path.rpartition(".")
    return dense_tensor(layer.get_submodule(module_path), name)


def _is_buffer(layer: nn.Module, path: str) -> bool:
    return not isinstance(_tensor(layer, path), nn.Parameter)


def _make_kind(
    layer: nn.Module,
    name: str,
    block: str,
    count: int,
    owned: list[TensorSlice],
    dependents: list[tuple[TensorSlice, tuple]],
    router: str | None = None,
) -> StructureKind:
    """A kind whose parameter counts come from the shapes of the real tensors its slices cut."""

    def params(tensor_slice: TensorSlice) -> int:
        if _is_buffer(layer, tensor_slice.path):  # a router's per-expert buffer is state, not a parameter
            return 0
        return tensor_slice.params_per_unit(_tensor(layer, tensor_slice.path).shape)

    deps = tuple(DependentSlice(s, readers, params(s)) for s, readers in dependents)
    return StructureKind(name, block, count, tuple(owned), sum(params(s) for s in owned), deps, router)


def attention_kind(layer: nn.Module, names: AttentionNames) -> StructureKind:
    """Query heads of one layer; key/value rows owned (MHA) or dependent on their readers (GQA)."""
    attn = layer.get_submodule(names.module)
    head_dim = attn.head_dim
    o_path = f"{names.module}.{names.o}"
    n_heads = _linear(layer, o_path).in_features // head_dim
    if names.qkv is not None:
        fused = f"{names.module}.{names.qkv}"
        n_kv = (_linear(layer, fused).out_features - n_heads * head_dim) // (2 * head_dim)
        q = _Projection(fused, 0)
        k, v = _Projection(fused, n_heads * head_dim), _Projection(fused, (n_heads + n_kv) * head_dim)
    else:
        q = _Projection(f"{names.module}.{names.q}", 0)
        k, v = _Projection(f"{names.module}.{names.k}", 0), _Projection(f"{names.module}.{names.v}", 0)
        n_kv = _linear(layer, k.linear).out_features // head_dim
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads do not split evenly over {n_kv} key/value heads")

    owned = _row_slices(layer, q, head_dim) + [TensorSlice(f"{o_path}.weight", 1, head_dim)]
    kv_slices = _row_slices(layer, k, head_dim) + _row_slices(layer, v, head_dim)
    if names.projection_norms is not None:
        q_norm, k_norm = (f"{names.module}.{norm}.weight" for norm in names.projection_norms)
        owned.append(TensorSlice(q_norm, 0, head_dim))
        kv_slices.append(TensorSlice(k_norm, 0, head_dim))
    if n_kv == n_heads:
        return _make_kind(layer, ATTN_HEAD, "attention", n_heads, owned + kv_slices, [])
    group = n_heads // n_kv
    readers = tuple(tuple(range(j * group, (j + 1) * group)) for j in range(n_kv))
    return _make_kind(layer, ATTN_HEAD, "attention", n_heads, owned, [(s, readers) for s in kv_slices])


def mlp_kind(layer: nn.Module, names: MLPNames, name: str = MLP_CHANNEL, block: str = "mlp") -> StructureKind:
    """Channels of one layer's MLP (or shared expert): gate and up rows (up only, if plain), down columns."""
    down = f"{names.module}.{names.down}"
    channels = _linear(layer, down).in_features
    if names.gate_up is not None:
        fused = f"{names.module}.{names.gate_up}"
        inputs = [_Projection(fused, 0), _Projection(fused, channels)]
    elif names.gate is None:
        inputs = [_Projection(f"{names.module}.{names.up}", 0)]
    else:
        inputs = [_Projection(f"{names.module}.{names.gate}", 0), _Projection(f"{names.module}.{names.up}", 0)]
    owned = [s for projection in inputs for s in _row_slices(layer, projection, 1)]
    owned.append(TensorSlice(f"{down}.weight", 1, 1))
    return _make_kind(layer, name, block, channels, owned, [])


def expert_kind(layer: nn.Module, names: ExpertNames) -> StructureKind:
    """Channels inside every routed expert, expert by expert; an expert's router row lives while any does."""
    experts = f"{names.module}.{names.experts}"
    router = f"{names.module}.{names.router}"
    n_experts, _, per_expert = _tensor(layer, f"{experts}.{names.down}").shape  # [E, H, I]
    gate_up, down = f"{experts}.{names.gate_up}", f"{experts}.{names.down}"
    owned = [
        TensorSlice(gate_up, 1, 1, 0, n_experts),
        TensorSlice(gate_up, 1, 1, per_expert, n_experts),
        TensorSlice(down, 2, 1, 0, n_experts),
    ]
    readers = tuple(tuple(range(e * per_expert, (e + 1) * per_expert)) for e in range(n_experts))
    per_expert_tensors = [(TensorSlice(f"{router}.{names.router_weight}", 0, 1), readers)]  # the router rows come first
    for name in names.router_tensors:
        path = f"{names.module}.{name}"
        per_expert_tensors.append((TensorSlice(path, expert_axis(path, _tensor(layer, path).shape, n_experts), 1), readers))
    return _make_kind(layer, EXPERT_CHANNEL, "expert_mlp", n_experts * per_expert, owned, per_expert_tensors, router)


def expert_axis(path: str, shape: tuple[int, ...], n_experts: int) -> int:
    """The axis of a per-expert router tensor that runs over the experts (``[E]`` or ``[1, E]``)."""
    axes = [axis for axis, size in enumerate(shape) if size == n_experts]
    if len(axes) != 1 or any(size != 1 for axis, size in enumerate(shape) if axis != axes[0]):
        raise ValueError(f"{path} {list(shape)} does not hold one entry per expert ({n_experts})")
    return axes[0]


def _mlp_kinds(layer: nn.Module, declaration: DecoderDeclaration) -> dict[str, StructureKind]:
    """The MLP kinds of one layer: dense channels, or expert channels plus shared-expert channels."""
    names = declaration.experts
    if names is None or not hasattr(layer.get_submodule(names.module), names.experts):
        return {MLP_CHANNEL: mlp_kind(layer, declaration.mlp)}
    kinds = {EXPERT_CHANNEL: expert_kind(layer, names)}
    if names.shared is not None:
        shared = replace(names.shared_mlp, module=f"{names.module}.{names.shared}")
        kinds[SHARED_CHANNEL] = mlp_kind(layer, shared, SHARED_CHANNEL, "shared_expert")
    return kinds


def _writes_residual(tensor_slice: TensorSlice) -> bool:
    """A weight slice cutting input columns belongs to an output projection: what a block adds to the residual."""
    return not tensor_slice.is_bias and tensor_slice.axis == (2 if tensor_slice.stacked else 1)


def whole_layer_kind(layer: nn.Module, kinds: dict[str, StructureKind]) -> StructureKind:
    """The decoder layer as one unit: it owns every parameter; its slices are the whole output projections.

    A decoder layer adds ``o_proj(attention)`` and ``down_proj(mlp)`` (routed and shared experts
    alike) to the residual stream; with those weights and their biases zero, each block adds exactly 0
    (Gemma's post-norms too, as an RMS norm maps 0 to 0), so the masked layer is the identity.
    """
    writers = {s.path: s for kind in kinds.values() for s in kind.owned if _writes_residual(s)}
    owned = []
    for path, writer in sorted(writers.items()):
        if writer.stacked:  # routed experts' down projections [E, H, I]: every expert, a mask [E, 1, 1]
            owned.append(TensorSlice(path, 0, writer.stacked))
            continue
        # all input columns, the axis the kinds already cut: the weight's mask stays [1, in], not [out, in]
        owned.append(TensorSlice(path, 1, _tensor(layer, path).shape[1]))
        bias = dense_tensor(layer.get_submodule(writer.module_path), "bias")
        if bias is not None:
            owned.append(TensorSlice(f"{writer.module_path}.bias", 0, bias.shape[0]))
    return StructureKind(WHOLE_LAYER, WHOLE_LAYER, 1, tuple(owned), sum(p.numel() for p in layer.parameters()))


def _experts_placed_by_unknown_fields(per_layer_kinds: list[dict], declaration: DecoderDeclaration) -> bool:
    """Whether some layers hold routed experts and others not, by config fields the declaration does not name.

    Such a family (GLM-4.5's ``first_k_dense_replace``, ERNIE 4.5's ``moe_layer_start_index``) builds each
    layer from its index: removing a layer would renumber the rest onto the wrong kind, so its layers get no
    whole-layer structure (layer-removing methods are refused) unless the declaration names the fields
    (``ExpertNames.dense_layers_field``), which compaction then rewrites.
    """
    holds = {EXPERT_CHANNEL in kinds for kinds in per_layer_kinds}
    return len(holds) > 1 and (declaration.experts is None or declaration.experts.dense_layers_field is None)


def decoder_anatomy(model: nn.Module, declaration: DecoderDeclaration, adapter_name: str) -> ModelAnatomy:
    """The anatomy of every decoder layer, read off the model's real module shapes."""
    layers = []
    partial = declaration.attention is None  # mixers stay whole: no layer is the identity with its MLP zeroed
    modules = model.get_submodule(declaration.layers)
    per_layer_kinds = [_mlp_kinds(layer, declaration) for layer in modules]
    removable = not partial and not _experts_placed_by_unknown_fields(per_layer_kinds, declaration)
    for index, (layer, mlp_kinds) in enumerate(zip(modules, per_layer_kinds, strict=True)):
        attention = {} if partial else {ATTN_HEAD: attention_kind(layer, declaration.attention)}
        kinds = {**attention, **mlp_kinds}
        total = sum(p.numel() for p in layer.parameters())
        owned = sum(kind.dense_params for kind in kinds.values())
        whole = whole_layer_kind(layer, kinds) if removable else None
        layers.append(LayerAnatomy(index, f"{declaration.layers}.{index}", kinds, total - owned, whole))
    kind_names = tuple(dict.fromkeys(name for layer in layers for name in layer.kinds))
    hidden = None if partial else hidden_dimension(model, tuple(layers))
    return ModelAnatomy(adapter_name, tuple(layers), kind_names, hidden)
