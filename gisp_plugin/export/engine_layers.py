"""A pruned (or dense) decoder layer as inference engines lay it out: whole tensors, even key/value groups.

Engines run grouped-query attention with every key/value head serving the same number of query heads,
in contiguous groups (query head ``h`` reads key/value head ``h // group``). A compacted model may break
both: under uneven groups it keeps one key/value copy per query head (``GatheredLinear``), and its query
heads are in their dense order. ``read_layer`` turns one layer of any declared family into plain tensors
and ``even_groups`` makes the groups even *exactly*, by one of two moves:

- ``pad``: every key/value head gets the largest group's number of query heads, the missing ones zero
  query heads (zero query rows and zero output columns: their attention output is multiplied by zero, so
  they add exactly nothing); the key/value cache keeps its size;
- ``replicate``: every query head gets its own copy of its key/value head (groups of one); the key/value
  cache grows to one head per query head.

Both add ``(executed heads - kept heads)`` heads' worth of rows; ``auto`` takes the one that executes fewer
parameters, ``pad`` on a tie (it keeps the key/value cache small, which decoding reads at every token).
Query heads are reordered so that each group is contiguous; the output projection's columns follow them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from gisp_plugin.anatomy.decoder import AttentionNames, DecoderDeclaration, MLPNames

GROUPINGS = ("auto", "pad", "replicate")


@dataclass
class AttentionTensors:
    """One layer's attention as plain tensors: ``q`` ``[n_head * head_dim, H]``, ``k``/``v`` ``[n_kv * head_dim, H]``,
    ``o`` ``[H, n_head * head_dim]``; query head ``h`` reads key/value head ``kv_of[h]``."""

    head_dim: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    kv_of: list[int]
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None

    @property
    def n_head(self) -> int:
        return self.q.shape[0] // self.head_dim

    @property
    def n_kv(self) -> int:
        return self.k.shape[0] // self.head_dim

    @property
    def is_even(self) -> bool:
        """Every key/value head serves the same number of query heads, in contiguous groups."""
        if self.n_kv == 0:
            return self.n_head == 0
        group = self.n_head // self.n_kv
        return self.n_head % self.n_kv == 0 and self.kv_of == [h // group for h in range(self.n_head)]


@dataclass
class MLPTensors:
    """One layer's MLP as plain tensors: ``gate``/``up`` ``[F, H]``, ``down`` ``[H, F]``; ``gate`` is ``None`` for a
    plain (non-gated) MLP (StarCoder2, Nemotron)."""

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.down.shape[1]


@dataclass
class EngineLayer:
    """A decoder layer's attention and MLP tensors plus every other tensor (norms) by its path in the layer."""

    attention: AttentionTensors
    mlp: MLPTensors
    others: dict[str, torch.Tensor] = field(default_factory=dict)


def _effective(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Weight and bias as the layer applies them (a ``GatheredLinear`` repeats rows), and each row's stored row."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    gather = getattr(linear, "gather", None)
    rows = torch.arange(weight.shape[0]) if gather is None else torch.tensor(gather, dtype=torch.long)
    if gather is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    return weight, bias, rows


def _split(tensor: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(sizes) if tensor is None else list(tensor.split(sizes))


def read_attention(layer: nn.Module, names: AttentionNames) -> AttentionTensors:
    """The attention of one layer (separate or fused q/k/v; uneven groups read through their gather lists)."""
    attn = layer.get_submodule(names.module)
    head_dim = attn.head_dim
    o = attn.get_submodule(names.o)
    n_head = o.in_features // head_dim
    if names.qkv is not None:
        weight, bias, rows = _effective(attn.get_submodule(names.qkv))
        n_kv = (weight.shape[0] - n_head * head_dim) // (2 * head_dim)
        sizes = [n_head * head_dim, n_kv * head_dim, n_kv * head_dim]
        q, k, v = weight.split(sizes)
        q_bias, k_bias, v_bias = _split(bias, sizes)
        k_rows = rows.split(sizes)[1]
    else:
        q, q_bias, _ = _effective(attn.get_submodule(names.q))
        k, k_bias, k_rows = _effective(attn.get_submodule(names.k))
        v, v_bias, _ = _effective(attn.get_submodule(names.v))
        n_kv = k.shape[0] // head_dim
    group = n_head // n_kv if n_kv else 1
    # the key/value head each query head reads, named by its first stored row: copies of one head share it
    source = [int(k_rows[(h // group) * head_dim]) for h in range(n_head)]
    first_reader = {row: h for h, row in reversed(list(enumerate(source)))}
    distinct = sorted(first_reader, key=first_reader.get)
    heads = [first_reader[row] // group for row in distinct]  # the effective k/v head that holds each distinct one
    rows_of = _head_rows(heads, head_dim)
    pick = lambda t: None if t is None else t[rows_of]  # noqa: E731
    return AttentionTensors(
        head_dim=head_dim,
        q=q,
        k=k[rows_of],
        v=v[rows_of],
        o=o.weight.detach(),
        kv_of=[distinct.index(row) for row in source],
        q_bias=q_bias,
        k_bias=pick(k_bias),
        v_bias=pick(v_bias),
        o_bias=None if o.bias is None else o.bias.detach(),
    )


def read_mlp(layer: nn.Module, names: MLPNames) -> MLPTensors:
    """The MLP of one layer (separate or fused gate/up projections, or a plain up/down one)."""
    mlp = layer.get_submodule(names.module)
    down = mlp.get_submodule(names.down)
    if names.gate_up is not None:
        fused = mlp.get_submodule(names.gate_up)
        gate, up = fused.weight.detach().chunk(2)
        gate_bias, up_bias = (None, None) if fused.bias is None else fused.bias.detach().chunk(2)
    else:
        gate_linear = None if names.gate is None else mlp.get_submodule(names.gate)
        up_linear = mlp.get_submodule(names.up)
        gate = None if gate_linear is None else gate_linear.weight.detach()
        up = up_linear.weight.detach()
        gate_bias = None if gate_linear is None or gate_linear.bias is None else gate_linear.bias.detach()
        up_bias = None if up_linear.bias is None else up_linear.bias.detach()
    return MLPTensors(gate, up, down.weight.detach(), gate_bias, up_bias, None if down.bias is None else down.bias.detach())


def read_layer(layer: nn.Module, declaration: DecoderDeclaration) -> EngineLayer:
    """One decoder layer of a dense-MLP family as plain tensors; routed experts are refused."""
    mlp = layer.get_submodule(declaration.mlp.module)
    if declaration.experts is not None and hasattr(mlp, declaration.experts.experts):
        raise ValueError("routed experts have no per-layer engine layout here; export a mixture of experts with --format hf")
    attention = read_attention(layer, declaration.attention)
    dense_mlp = read_mlp(layer, declaration.mlp)
    consumed = {f"{declaration.attention.module}.{n}" for n in _attention_modules(declaration.attention)}
    consumed |= {f"{declaration.mlp.module}.{n}" for n in _mlp_modules(declaration.mlp)}
    # parameters and persistent buffers (Apertus's xIELU keeps its beta as one) outside the projections
    others = {name: tensor.detach() for name, tensor in layer.state_dict().items() if name.rsplit(".", 1)[0] not in consumed}
    return EngineLayer(attention, dense_mlp, others)


def _attention_modules(names: AttentionNames) -> tuple[str, ...]:
    return (names.qkv, names.o) if names.qkv is not None else (names.q, names.k, names.v, names.o)


def _mlp_modules(names: MLPNames) -> tuple[str, ...]:
    return names.projections


def _zero_rows(tensor: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    return None if tensor is None else torch.cat([tensor, tensor.new_zeros(rows, *tensor.shape[1:])])


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """The rows of a projection that heads ``heads`` own, in that order (head ``h``: rows ``h*hd .. (h+1)*hd``)."""
    if not heads:
        return torch.arange(0)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _query_heads_in_order(attention: AttentionTensors, order: list[int]) -> dict[str, torch.Tensor | None]:
    """Query rows, their biases and output columns laid out as ``order``; index ``n_head`` names a zero head.

    A zero query head (zero query rows, zero output columns) is inert: its attention output is multiplied by
    zero, so padding groups with it keeps the layer's output exactly.
    """
    hd = attention.head_dim
    rows = _head_rows(order, hd)
    q, q_bias = _zero_rows(attention.q, hd), _zero_rows(attention.q_bias, hd)
    o = torch.cat([attention.o, attention.o.new_zeros(attention.o.shape[0], hd)], dim=1)
    return {"q": q[rows], "q_bias": None if q_bias is None else q_bias[rows], "o": o[:, rows]}


def grouping_cost(attention: AttentionTensors, grouping: str) -> int:
    """Query plus key/value heads executed after making the groups even with ``grouping`` (``pad`` or ``replicate``).

    A query head costs its query rows and output columns, a key/value head its key and value rows: both
    ``2 * head_dim * hidden`` parameters, so heads are the unit.
    """
    if grouping == "replicate":
        return 2 * attention.n_head  # one key/value copy per query head
    largest = max((attention.kv_of.count(j) for j in range(attention.n_kv)), default=0)
    return largest * attention.n_kv + attention.n_kv


def even_groups(attention: AttentionTensors, grouping: str = "auto") -> AttentionTensors:
    """The same attention with even, contiguous groups (exactly equal outputs; see the module docstring)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")
    if attention.is_even:
        return attention
    if grouping == "auto":
        grouping = min(("pad", "replicate"), key=lambda g: grouping_cost(attention, g))
    if grouping == "replicate":
        kv_rows = _head_rows(attention.kv_of, attention.head_dim)
        pick = lambda t: None if t is None else t[kv_rows]  # noqa: E731
        return replace(
            attention,
            k=attention.k[kv_rows],
            v=attention.v[kv_rows],
            k_bias=pick(attention.k_bias),
            v_bias=pick(attention.v_bias),
            kv_of=list(range(attention.n_head)),
        )
    groups = [[h for h, kv in enumerate(attention.kv_of) if kv == j] for j in range(attention.n_kv)]
    size = max(len(g) for g in groups)
    zero_head = attention.n_head  # the index of an appended zero query head
    order = [h for g in groups for h in g + [zero_head] * (size - len(g))]
    return replace(attention, **_query_heads_in_order(attention, order), kv_of=[h // size for h in range(len(order))])


def zero_head_attention(attention: AttentionTensors) -> AttentionTensors:
    """One inert head (zero query, key, value rows and output columns) for a layer that kept none.

    Its output is ``0 @ softmax(0) = 0``, so the layer still adds only its output bias; engines that read
    the head size from a layer, or drop the output bias of a head-less layer, need the head to be there.
    """
    hidden, hd = attention.o.shape[0], attention.head_dim
    zeros = attention.q.new_zeros(hd, attention.q.shape[1])
    bias = lambda b: None if b is None else b.new_zeros(hd)  # noqa: E731
    return replace(
        attention,
        q=zeros,
        k=zeros.clone(),
        v=zeros.clone(),
        o=attention.o.new_zeros(hidden, hd),
        kv_of=[0],
        q_bias=bias(attention.q_bias),
        k_bias=bias(attention.k_bias),
        v_bias=bias(attention.v_bias),
    )


def pad_heads(attention: AttentionTensors, n_head: int, n_kv: int) -> AttentionTensors:
    """Even groups padded with inert heads up to ``n_head`` query and ``n_kv`` key/value heads (same groups)."""
    if n_kv == 0 or n_head % n_kv:
        raise ValueError(f"{n_head} query heads do not split evenly over {n_kv} key/value heads")
    if not attention.is_even or attention.n_kv > n_kv or attention.n_head > n_head:
        raise ValueError(f"a layer with {attention.n_head}/{attention.n_kv} heads cannot be padded to {n_head}/{n_kv}")
    group, hd = n_head // n_kv, attention.head_dim
    have = attention.n_head // attention.n_kv if attention.n_kv else 0
    if attention.n_kv and have > group:
        raise ValueError(f"groups of {have} query heads cannot be padded to groups of {group}")
    # query head slots: each existing group padded to `group`, then whole zero groups
    order = []
    for j in range(n_kv):
        kept = [j * have + i for i in range(have)] if j < attention.n_kv else []
        order += kept + [attention.n_head] * (group - len(kept))
    extra_kv = (n_kv - attention.n_kv) * hd
    return replace(
        attention,
        **_query_heads_in_order(attention, order),
        k=_zero_rows(attention.k, extra_kv) if extra_kv else attention.k,
        v=_zero_rows(attention.v, extra_kv) if extra_kv else attention.v,
        k_bias=_zero_rows(attention.k_bias, extra_kv) if extra_kv else attention.k_bias,
        v_bias=_zero_rows(attention.v_bias, extra_kv) if extra_kv else attention.v_bias,
        kv_of=[h // group for h in range(n_head)],
    )


def pad_mlp(mlp: MLPTensors, width: int) -> MLPTensors:
    """The MLP with zero channels appended up to ``width`` (a zero down column adds exactly nothing)."""
    extra = width - mlp.width
    if extra < 0:
        raise ValueError(f"an MLP of {mlp.width} channels cannot be padded to {width}")
    if not extra:
        return mlp
    return replace(
        mlp,
        gate=_zero_rows(mlp.gate, extra),
        up=_zero_rows(mlp.up, extra),
        down=torch.cat([mlp.down, mlp.down.new_zeros(mlp.down.shape[0], extra)], dim=1),
        gate_bias=_zero_rows(mlp.gate_bias, extra),
        up_bias=_zero_rows(mlp.up_bias, extra),
    )
