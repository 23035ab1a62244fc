"""Compaction of the hidden dimension: the family's own model with a smaller ``hidden_size``, exactly.

The masked model keeps the dense width ``H``; a removed channel is 0 in the residual stream (its embedding
column and norm entries are masked) and every RMS norm over the stream still divides by ``H``. The compacted
model has ``H' < H`` channels, and its norms divide by ``H'``. Write ``S`` for the sum of squares of the
kept channels of a norm's input ``x`` (the removed ones are 0) and ``g`` for the norm's gain. The masked
norm computes ``g * x / sqrt(S / H + eps)``.

*Rescaling eps* (the textbook route): ``sqrt(S / H + eps) = sqrt(H' / H) * sqrt(S / H' + eps * H / H')``, so
gains ``g * sqrt(H / H')`` and ``eps * H / H'`` give every norm over the stream its masked output. But a
family's config has one ``rms_norm_eps`` for all its norms, and the per-head ``q_norm``/``k_norm`` of Qwen3
and Gemma 3 (over ``head_dim``) and OLMoE's projection norms are built from it too, over widths that did not
change: their outputs would move. So we keep ``eps`` and move the scale into the stream instead.

*Rescaling the stream* (what is done here): let the compacted residual stream be ``t = sqrt(H' / H)`` times
the masked one (kept channels). A norm over ``H'`` fed ``t * x`` computes
``g' * t * x / sqrt(t^2 * S / H' + eps) = g' * t * x / sqrt(S / H + eps)``, the masked output times
``g' * t / g``. So:

- every projection that writes the stream (its rows along the hidden axis, and its bias) is scaled by ``t``;
  the embedding by ``t`` (times ``c / c'`` where the family scales embeddings by a factor that follows the
  width, Gemma's ``sqrt(hidden_size)``: ``c`` and ``c'`` are measured, not named);
- a norm whose output is read by a module (``input_layernorm``, Gemma's ``pre_feedforward_layernorm``, the
  final norm before the LM head) must give the masked output: gain ``g / t``;
- a norm whose output is added to the stream (Gemma's post-norms) takes a writer's output (scaled by ``t``)
  and must give ``t`` times the masked output: gain ``g``, unchanged;
- with a tied LM head the head is the embedding, scaled by ``e = t * c / c'``: the final norm's gain is also
  divided by ``e``, so the logits are unchanged.

Which norms are read by a module is measured with one short forward pass (a norm's output tensor handed to
another module), and how a norm's weight makes its gain (``w``, or Gemma's ``1 + w``) by probing the norm
with weights 0 and 1: nothing is read from names. All of this is exact in real arithmetic; in float32 the
masked and the compacted logits agree to rounding.

*LayerNorm families* subtract the mean before dividing. The masked model's mean runs over ``H`` channels,
zeros included, so a removed channel becomes ``-mean`` after the subtraction and enters the variance; no
rescaling of weights, bias or eps of a norm over ``H'`` reproduces that for every input. Compaction refuses
a norm that subtracts its mean (found by the probe) rather than give a model that differs from its mask.

*Minitron* (arXiv 2407.14679) simply drops the channels of its LayerNorm/RMSNorm weights, embeddings and
projections and lets its distillation retrain the model; it never reproduces the masked model. Here a
hidden-channel mask and its compaction give the same logits, so any method's choice is measured exactly
before it is compacted, and retraining (``gisp_plugin.recovery``) stays a separate, optional step.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from gisp_plugin.anatomy.hidden import HiddenDimension, model_tensors
from gisp_plugin.anatomy.structures import HIDDEN_CHANNEL, MODEL_LEVEL, KeepMask, ModelAnatomy
from gisp_plugin.masking.sparsifier import dense_tensor


def without_hidden(keep: KeepMask) -> KeepMask:
    """``keep`` less its hidden-channel flags (what is left for the per-layer compaction)."""
    return KeepMask({key: flags for key, flags in keep.flags.items() if key != (MODEL_LEVEL, HIDDEN_CHANNEL)})


def gain_offset(norm: nn.Module, path: str) -> float:
    """``a`` in ``gain = a + w`` of an RMS norm (0 for Llama's ``w``, 1 for Gemma's ``1 + w``), probed.

    A norm with parameters other than its weight, or whose output is not a multiple of its input (it
    subtracts the mean: LayerNorm), is refused.
    """
    extra = sorted(name for name in model_tensors(norm) if name != "weight")
    if extra:
        raise ValueError(f"the norm {path} has parameters {extra} besides its weight; hidden channels need RMS norms")
    probe = copy.deepcopy(norm).float()  # with its mask, if one is attached: the probe sets the weight through it
    weight = dense_tensor(probe, "weight")
    if hasattr(probe, "parametrizations"):
        probe.parametrizations.weight[0].mask.fill_(True)
    x = torch.linspace(0.5, 2.0, weight.shape[0], device=weight.device)[None]
    with torch.no_grad():
        weight.fill_(0.0)
        out0 = probe(x).float()
        weight.fill_(1.0)
        out1 = probe(x).float()
    ratio = out1 / x
    if not torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4):
        raise ValueError(
            f"the norm {path} subtracts its mean (LayerNorm): a masked and a compacted model cannot agree; "
            "hidden channels need RMS norms"
        )
    offset = out0 / (out1 - out0)
    return float(offset.mean())


@torch.no_grad()
def stream_probe(model: nn.Module, first_layer: nn.Module, hidden: HiddenDimension) -> tuple[set[str], torch.Tensor]:
    """One short forward pass: the norms whose output another module reads, and the first layer's input."""
    norms = {model.get_submodule(path): path for path in hidden.norms}
    outputs: dict[int, str] = {}  # data pointer of each norm's output, kept alive in ``alive``
    alive: list[torch.Tensor] = []  # so no later tensor reuses their memory and fakes a match
    read: set[str] = set()
    first_input: list[torch.Tensor] = []

    def on_norm(module, args, output):
        alive.append(output)
        outputs[output.data_ptr()] = norms[module]

    def on_call(module, args, kwargs):
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, torch.Tensor) and module not in norms and value.data_ptr() in outputs:
                read.add(outputs[value.data_ptr()])

    def on_first(module, args, kwargs):
        first_input.append(args[0] if args else kwargs["hidden_states"])

    handles = [norm.register_forward_hook(on_norm) for norm in norms]
    handles += [module.register_forward_pre_hook(on_call, with_kwargs=True) for module in model.modules()]
    handles.append(first_layer.register_forward_pre_hook(on_first, with_kwargs=True))
    device = dense_tensor(model.get_input_embeddings(), "weight").device
    ids = _probe_ids(model).to(device)
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(hidden.norms) - set(outputs.values()))
    if missing:
        raise ValueError(f"the norm {missing[0]} never ran in a forward pass; cannot tell where its output goes")
    return read, first_input[0]


def _probe_ids(model: nn.Module) -> torch.Tensor:
    vocab = dense_tensor(model.get_input_embeddings(), "weight").shape[0]
    return (torch.arange(6) * 7919 % vocab)[None]


def _embedding_factor(model: nn.Module, first_input: torch.Tensor, kept: torch.Tensor) -> float:
    """``c`` with the first layer's input ``c * embedding[ids]`` (on the kept channels), measured."""
    embedding = dense_tensor(model.get_input_embeddings(), "weight")
    looked_up = embedding[_probe_ids(model).to(embedding.device)][..., kept].double()
    seen = first_input[..., kept].double()
    usable = looked_up.abs() > 1e-6
    ratio = seen[usable] / looked_up[usable]
    if ratio.numel() == 0 or not torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-3):
        raise ValueError("the first decoder layer's input is not a multiple of the token embedding; cannot cut the hidden size")
    return float(ratio.mean().detach())


def _writes_stream(tensor: torch.Tensor, axis: int) -> bool:
    """A weight whose hidden axis holds its output rows (``[..., H, in]``), or a 1-D output bias."""
    return tensor.dim() == 1 or axis == tensor.dim() - 2


def _config(model: PreTrainedModel, width: int, head_dim: int | None):
    values = model.config.to_dict()
    values["hidden_size"] = width
    if head_dim is not None:  # families that derive head_dim from hidden_size when it is unset
        values["head_dim"] = head_dim
    try:
        config = type(model.config).from_dict(values)
    except Exception as err:  # the family's own checks (Llama: a multiple of the head count)
        cause = err.__cause__ or err
        raise ValueError(f"the {model.config.model_type} config refuses hidden_size {width}: {cause}") from err
    config._attn_implementation = model.config._attn_implementation
    return config


def _head_dim(anatomy: ModelAnatomy) -> int | None:
    for layer in anatomy.layers:
        for kind in layer.kinds.values():
            if kind.block == "attention":
                return kind.owned[0].width
    return None


def compact_hidden(model: PreTrainedModel, anatomy: ModelAnatomy, keep: KeepMask) -> PreTrainedModel:
    """The family's own model, ``hidden_size`` cut to the kept hidden channels, equal in outputs to ``model``
    masked by the hidden-channel flags of ``keep`` (its other flags are ignored here)."""
    hidden = anatomy.hidden_dimension()
    flags = keep[MODEL_LEVEL, HIDDEN_CHANNEL]
    kept = flags.nonzero().flatten()
    if kept.numel() == 0:
        raise ValueError(f"every one of the {hidden.width} hidden channels is removed; a model needs at least one")
    scale = math.sqrt(kept.numel() / hidden.width)
    read, first_input = stream_probe(model, model.get_submodule(anatomy.layers[0].prefix), hidden)
    embedding_before = _embedding_factor(model, first_input, kept)
    offsets = {path: gain_offset(model.get_submodule(path), path) for path in hidden.norms}

    state = {path: tensor.detach().clone() for path, tensor in model_tensors(model).items()}
    for tensor_slice in hidden.kind.owned:
        tensor = dense_tensor(model.get_submodule(tensor_slice.module_path), tensor_slice.tensor_name)
        cut = tensor.detach().index_select(tensor_slice.axis, kept.to(tensor.device))
        module_path = tensor_slice.module_path
        if module_path in offsets:
            gain = 1.0 / scale if module_path in read else 1.0
            cut = (cut.double() + offsets[module_path]) * gain - offsets[module_path]
        elif tensor_slice.path not in (hidden.embedding, hidden.head) and _writes_stream(tensor, tensor_slice.axis):
            cut = cut.double() * scale
        state[tensor_slice.path] = cut.to(tensor.dtype)

    with no_init_weights():
        compact = type(model)(_config(model, kept.numel(), _head_dim(anatomy)))
    built = compact.state_dict()
    for path, tensor in state.items():
        if path in built and built[path].shape != tensor.shape:  # OLMoE builds q_norm over hidden_size
            raise ValueError(
                f"the {model.config.model_type} model builds {path} {tuple(built[path].shape)} from hidden_size, "
                f"but it holds {tuple(tensor.shape)}; its hidden size cannot be cut in its own config"
            )
    compact.load_state_dict(state, strict=False, assign=True)
    compact.tie_weights()
    compact.to(first_input.device)
    compact.generation_config = model.generation_config
    compact.eval()

    _, compact_input = stream_probe(compact, compact.get_submodule(anatomy.layers[0].prefix), hidden)  # same paths
    factor = scale * embedding_before / _embedding_factor(compact, compact_input, torch.arange(kept.numel()))
    with torch.no_grad():
        compact.get_input_embeddings().weight.mul_(factor)
        if hidden.head is None:  # the tied head grew by ``factor`` too: the norm before it shrinks by as much
            inside = tuple(f"{layer.prefix}." for layer in anatomy.layers)
            for path in hidden.norms:
                if not path.startswith(inside):
                    weight = compact.get_submodule(path).weight
                    weight.copy_(((weight.double() + offsets[path]) / factor - offsets[path]).to(weight.dtype))
    return compact
