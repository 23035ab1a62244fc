"""Loading a model straight into FSDP2 shards: no rank ever materialises the whole model.

The model is built on the meta device from its config (no memory), sharded with ``shard_model``, and
given real storage for this rank's shards only (``to_empty``). Each rank then reads just its rows of
each tensor from the safetensors files (``safe_open(...).get_slice``), so a 70B checkpoint costs each of
N ranks about 1/N of it in memory and in reading. Non-persistent buffers (rotary ``inv_freq``, Gemma's
embedding scale) are not in checkpoints: the model is built with its parameters on meta but its buffers
real (accelerate's ``init_empty_weights(include_buffers=False)``), so they are computed exactly as the
model's own ``__init__`` does and put back after ``to_empty``. Tied weights stay tied (the LM head and
the embeddings are one parameter, sharded once).

Usage, in every rank of ``torchrun --nproc-per-node N``::

    setup = init_distributed("cuda", fsdp=True)
    model, tokenizer = load_sharded_model("meta-llama/Meta-Llama-3-8B", "cuda", "bfloat16", setup)
    subnetworks = list(run_method(model, tokenizer, "gisp", [0.2, 0.4]))
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from gisp_plugin.distributed.context import DistributedSetup, device_for
from gisp_plugin.distributed.fsdp import shard_model
from gisp_plugin.inputs import InputError, check_device
from gisp_plugin.masking.sparsifier import BroadcastStructuredSparsity
from gisp_plugin.models.loading import (
    ModelLoadError,
    _tokenizer,
    check_weights,
    checkpoint_name,
    parse_dtype,
    resolve_model_path,
    tensor_files,
)

log = logging.getLogger(__name__)


def local_rows(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The rows ``[start, stop)`` of dim 0 this rank holds of a dim-0-sharded ``DTensor`` (``None``: all of it)."""
    if not isinstance(tensor, DTensor):
        return None
    (placement,) = tensor.placements
    if not isinstance(placement, Shard):
        return None
    if placement.dim != 0:
        raise ValueError(f"expected FSDP's dim-0 shards, got {placement}")
    mesh = tensor.device_mesh
    chunk = -(-tensor.shape[0] // mesh.size())  # torch.chunk sizes, as FSDP2 shards
    start = min(mesh.get_local_rank() * chunk, tensor.shape[0])
    return start, start + tensor.to_local().shape[0]


def _read_shards(model: nn.Module, folder: str, dtype: torch.dtype) -> None:
    """Copy this rank's rows of every parameter and persistent buffer from the safetensors files."""
    where = tensor_files(folder)
    handles: dict[Path, Any] = {}
    try:
        tensors = list(model.named_parameters()) + [
            (name, buffer)
            for name, buffer in model.named_buffers()
            if not _non_persistent(model, name) and not isinstance(_owner(model, name), BroadcastStructuredSparsity)
        ]
        for name, tensor in tensors:
            key = checkpoint_name(name)
            if key not in where:
                raise ModelLoadError(
                    f"{folder!r} has no tensor {key!r}; sharded loading needs checkpoint names that match the "
                    "model's (Llama-like dense families); load this model without --fsdp"
                )
            file = where[key]
            handles.setdefault(file, safe_open(str(file), framework="pt"))
            stored = handles[file].get_slice(key)
            if tuple(stored.get_shape()) != tuple(tensor.shape):
                shape = tuple(stored.get_shape())
                raise ModelLoadError(f"{key} is {shape} in {file.name}, but the config makes it {tuple(tensor.shape)}")
            rows = local_rows(tensor)
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if rows is not None and rows[0] == rows[1]:
                continue  # this rank holds none of it (more ranks than rows)
            part = stored[rows[0] : rows[1]] if rows is not None else stored[:]
            with torch.no_grad():
                local.copy_(part.to(dtype=local.dtype))
    finally:
        handles.clear()


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def _non_persistent(model: nn.Module, name: str) -> bool:
    return name.rpartition(".")[2] in _owner(model, name)._non_persistent_buffers_set


def load_sharded_model(
    name_or_folder: str,
    device: str | torch.device,
    dtype: str | torch.dtype,
    setup: DistributedSetup,
    cpu_offload: bool = False,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Model (sharded across the ranks of ``setup``, dense masks attached) and tokenizer, read shard by shard.

    ``device``: where this rank computes (``cuda`` means ``cuda:LOCAL_RANK``). ``cpu_offload``: keep the
    shards in CPU memory between uses (FSDP2 ``CPUOffloadPolicy``). Every rank must call it.
    """
    if not dist.is_initialized():
        raise InputError("sharded loading needs the ranks of a torchrun launch: call init_distributed(device, fsdp=True) first")
    torch_dtype = parse_dtype(dtype)
    device = check_device(device_for(setup, str(device)))
    path = resolve_model_path(name_or_folder)
    if not Path(path).exists():
        path = _download(path, setup)
    check_weights(path)
    config = AutoConfig.from_pretrained(path)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers computed as the model does
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.tie_weights()  # again outside the context, whose patched register_parameter copies a tied parameter
    computed = {name: buffer.clone() for name, buffer in model.named_buffers() if _non_persistent(model, name)}
    shard_model(model, cpu_offload=cpu_offload)
    model.to_empty(device="cpu" if cpu_offload else device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in computed:
                buffer.copy_(computed[name])
            elif isinstance(_owner(model, name), BroadcastStructuredSparsity):
                buffer.fill_(True)  # the dense masks shard_model attached
    _read_shards(model, path, torch_dtype)
    log.info("rank %d loaded its shard of %s", setup.rank, path)
    return model.eval(), _tokenizer(path)


def _download(repo_id: str, setup: DistributedSetup) -> str:
    """A local snapshot of a hub model's config, tokenizer and safetensors (rank 0 downloads, the others wait)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    if setup.is_main:
        try:
            snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as err:  # the hub raises many types; the user needs the one line
            raise ModelLoadError(f"could not download {repo_id!r}: {str(err).splitlines()[0]}") from err
    if setup.enabled:
        dist.barrier()
    return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
