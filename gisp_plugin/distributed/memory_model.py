"""How much memory a GISP scoring pass needs per rank, from the model's config alone (``gisp plan``).

The model is built on the meta device from its config (no weights, no memory), so every count below
is the real module's: parameters per tensor, which tensors the gradient engine sums (the prunable
linear weights, ``weight_paths``), which tensors carry keep masks. The terms, in bytes per rank:

- **weights**: all parameters in the model dtype; under FSDP each rank keeps ``1/N`` of them.
- **gathered (FSDP)**: what all-gathers put back whole for a while: the root's own tensors (embeddings,
  LM head, final norm: FSDP keeps the root gathered through a forward and backward) and two decoder
  layers (the one computing and the one prefetched).
- **masked copies**: a masked weight is computed from the dense one; one process caches every masked
  weight for the pass (``parametrize.cached``: one copy of each masked tensor), FSDP recomputes them
  one layer at a time (one layer's masked tensors).
- **gradient sums**: float32, one per summed weight; ``1/N`` each under FSDP. Plus the gradient as it
  arrives: one tensor at a time on one process; one layer's unsharded gradient plus its reduce-scatter
  output under FSDP.
- **masks**: one bool per row or column a structure cuts (replicated; tiny).
- **activations** per micro-batch of ``B`` sequences of ``S`` tokens, kept for backward: per layer and
  token ``4*hidden + 5*q_width + 4*intermediate`` values in the model dtype (the norm inputs, the
  projection inputs, q/k/v/attention output, the MLP's gate, up, activation and product), plus the
  logits (model dtype) and their float32 copy and log-softmax for the loss; with gradient
  checkpointing only each layer's input stays, and one layer is recomputed at a time. Attention is
  assumed to run as SDPA/flash attention (no ``S x S`` matrix kept); eager attention adds
  ``heads * S`` values per token per layer.

It is an estimate of the steady state (allocator fragmentation, CUDA context and framework buffers come
on top): ``fits`` keeps 10% of each GPU free for those. ``benchmarks/distributed.py`` sets the estimate
beside measured peaks.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.importance.gradients import weight_paths, weight_tensor
from gisp_plugin.inputs import InputError
from gisp_plugin.models.loading import DEFAULT_MODEL, ModelLoadError, parse_dtype, resolve_model_path

GPU_SIZES_GB = (24, 40, 48, 80, 141)
USABLE = 0.9  # of a GPU's memory, leaving room for the CUDA context, allocator slack and framework buffers
GIB = 2**30


@dataclass(frozen=True)
class ModelCounts:
    """Element counts read off the meta-built model."""

    params: int  # every parameter (tied ones once)
    root_params: int  # outside the decoder layers: embeddings, final norm, LM head
    layer_params: int  # the largest decoder layer
    summed: int  # weights whose float32 gradient sums the engine keeps (prunable linear weights)
    layer_summed: int  # of those, in the largest layer
    largest_summed: int  # the largest single summed weight
    masked: int  # elements of tensors carrying a keep mask (their masked copies)
    layer_masked: int
    mask_elements: int  # bools of all masks (rows or columns, broadcast)
    layers: int
    hidden: int
    intermediate: int  # per-token MLP width (all routed experts' active width for MoE: top-k * expert width)
    q_width: int  # heads * head_dim
    heads: int
    vocab: int


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of one GISP scoring pass (see the module docstring for each term)."""

    model: str
    nproc: int
    fsdp: bool
    cpu_offload: bool
    dtype: str
    batch_size: int
    seqlen: int
    counts: ModelCounts
    weights: int
    gathered: int
    masked_copies: int
    gradient_sums: int
    gradient_in_flight: int
    masks: int
    activations: int
    activations_checkpointed: int

    @property
    def device_total(self) -> int:
        """Bytes on the accelerator (without checkpointing); with CPU offload the shards live in CPU memory."""
        resident = 0 if self.cpu_offload else self.weights + self.gradient_sums
        return resident + self.gathered + self.masked_copies + self.gradient_in_flight + self.masks + self.activations

    @property
    def device_total_checkpointed(self) -> int:
        return self.device_total - self.activations + self.activations_checkpointed

    @property
    def host_total(self) -> int:
        """Bytes in CPU memory for the offloaded shards (0 without offload)."""
        return self.weights + self.gradient_sums if self.cpu_offload else 0

    def fits(self, checkpointed: bool = False) -> list[int]:
        """The GPU sizes (GB) whose usable memory holds the pass."""
        need = self.device_total_checkpointed if checkpointed else self.device_total
        return [size for size in GPU_SIZES_GB if need <= USABLE * size * GIB]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            device_total=self.device_total,
            device_total_checkpointed=self.device_total_checkpointed,
            host_total=self.host_total,
            fits_gb=self.fits(),
            fits_gb_checkpointed=self.fits(True),
        )
        return out


def read_config(model: str) -> PretrainedConfig:
    """The config of a ``config.json`` file, a model folder, the built-in default, or a hub id."""
    path = Path(model).expanduser()
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"{model!r} is not a readable config.json ({err})") from err
        if not isinstance(fields, dict) or fields.get("model_type") not in CONFIG_MAPPING:
            kind = fields.get("model_type") if isinstance(fields, dict) else None
            raise ModelLoadError(f"{model!r}: model_type {kind!r} is not a transformers model type")
        return CONFIG_MAPPING[fields["model_type"]].from_dict(fields)
    try:
        return AutoConfig.from_pretrained(resolve_model_path(model))
    except (OSError, ValueError) as err:
        if isinstance(err, ModelLoadError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not read the config of {model!r} ({first}); give a config.json, a model folder or {DEFAULT_MODEL!r}"
        ) from err


def count_model(config: PretrainedConfig) -> ModelCounts:
    """Counts from a meta-device build of ``config`` (and the adapter's anatomy of it)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    layers = adapter.decoder_layers(model)
    params = sum(p.numel() for p in model.parameters())
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    summed_paths = weight_paths(anatomy)
    summed_by_layer = [0] * len(layers)
    sizes = [weight_tensor(model, path).numel() for path in summed_paths]
    for path, size in zip(summed_paths, sizes, strict=True):
        summed_by_layer[_layer_of(path)] += size
    masked_by_layer = [0] * len(layers)
    mask_elements = 0
    for layer in anatomy.layers:
        paths = {s.path for kind in layer.kinds.values() for s in list(kind.owned) + [d.slice for d in kind.dependents]}
        for path in paths:
            tensor = weight_tensor(model, f"{layer.prefix}.{path}")
            masked_by_layer[layer.index] += tensor.numel()
            mask_elements += sum(tensor.shape)  # one flag per row and per column at most
    text = getattr(config, "text_config", config)
    experts_active = getattr(text, "num_experts_per_tok", 0) or 0
    expert_width = getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", 0)
    dense_width = getattr(text, "intermediate_size", 0) or 0
    intermediate = experts_active * expert_width + (getattr(text, "shared_expert_intermediate_size", 0) or 0)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelCounts(
        params=params,
        root_params=params - sum(layer_params),
        layer_params=max(layer_params),
        summed=sum(summed_by_layer),
        layer_summed=max(summed_by_layer),
        largest_summed=max(sizes, default=0),
        masked=sum(masked_by_layer),
        layer_masked=max(masked_by_layer),
        mask_elements=mask_elements,
        layers=len(layers),
        hidden=text.hidden_size,
        intermediate=intermediate if experts_active else dense_width,
        q_width=heads * head_dim,
        heads=heads,
        vocab=text.vocab_size,
    )


def _layer_of(path: str) -> int:
    parts = path.split(".")
    return int(parts[parts.index("layers") + 1])


def activation_bytes(counts: ModelCounts, dtype_bytes: int, tokens: int, checkpointed: bool) -> int:
    """Activations kept for backward over ``tokens`` tokens of a micro-batch (see the module docstring)."""
    per_layer = 4 * counts.hidden + 5 * counts.q_width + 4 * counts.intermediate  # values per token
    logits = counts.vocab * (dtype_bytes + 4 + 4)  # logits, their float32 copy, the log-softmax
    head = 2 * counts.hidden * dtype_bytes  # final norm input and LM head input
    if checkpointed:
        layers = counts.layers * counts.hidden * dtype_bytes + per_layer * dtype_bytes
    else:
        layers = counts.layers * per_layer * dtype_bytes
    return tokens * (layers + logits + head)


def plan_memory(
    model: str,
    nproc: int = 1,
    fsdp: bool = False,
    dtype: str = "bfloat16",
    batch_size: int = 2,
    seqlen: int = 256,
    cpu_offload: bool = False,
    config: PretrainedConfig | None = None,
) -> MemoryPlan:
    """The memory plan of GISP scoring for ``model`` (a config.json, folder, default or hub id) per rank.

    Without ``fsdp`` every rank holds the whole model (one process, or data parallel with ``nproc`` ranks).
    """
    check_plan_inputs(nproc, fsdp, batch_size, seqlen, cpu_offload)
    torch_dtype = parse_dtype(dtype)
    counts = count_model(config if config is not None else read_config(model))
    b = torch.tensor([], dtype=torch_dtype).element_size()
    shards = nproc if fsdp else 1
    if fsdp:
        weights = math.ceil(counts.params / shards) * b
        gathered = (counts.root_params + 2 * counts.layer_params) * b
        masked_copies = counts.layer_masked * b
        in_flight = counts.layer_summed * b + math.ceil(counts.layer_summed / shards) * 4
    else:
        weights, gathered = counts.params * b, 0
        masked_copies = counts.masked * b
        in_flight = counts.largest_summed * b  # one weight's gradient at a time
    tokens = batch_size * seqlen
    return MemoryPlan(
        model=model,
        nproc=nproc,
        fsdp=fsdp,
        cpu_offload=cpu_offload,
        dtype=str(torch_dtype).removeprefix("torch."),
        batch_size=batch_size,
        seqlen=seqlen,
        counts=counts,
        weights=weights,
        gathered=gathered,
        masked_copies=masked_copies,
        gradient_sums=math.ceil(counts.summed / shards) * 4,
        gradient_in_flight=in_flight,
        masks=counts.mask_elements,
        activations=activation_bytes(counts, b, tokens, checkpointed=False),
        activations_checkpointed=activation_bytes(counts, b, tokens, checkpointed=True),
    )


def check_plan_inputs(nproc: int, fsdp: bool, batch_size: int, seqlen: int, cpu_offload: bool) -> None:
    """One clear error for a bad request, before any config is read."""
    for name, value in (("--nproc", nproc), ("--batch-size", batch_size), ("--seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} {value!r} must be a whole number >= 1")
    if fsdp and nproc < 2:
        raise InputError(f"--fsdp shards the model across ranks: give --nproc 2 or more (got {nproc})")
    if cpu_offload and not fsdp:
        raise InputError("--cpu-offload offloads FSDP shards: give it with --fsdp")
