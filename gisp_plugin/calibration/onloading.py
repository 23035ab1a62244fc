"""Layer-wise onloading: the decoder layers live on a storage device, one at a time on the execution device.

The layer-wise methods (Wanda-sp, FLAP, OWL-sp) touch one decoder layer at a time, so a model larger
than the accelerator calibrates on it when only the embeddings and the current layer sit there, as
llm-compressor's sequential onloading does. ``LayerPlacement`` is that bookkeeping for the sequential
engine (``gisp_plugin.calibration.sequential``):

- ``storage="cpu"``: every layer waits in CPU memory and is moved to the execution device for its turn.
- ``storage="disk"``: a waiting layer holds no weights at all (meta tensors); its turn reads them from
  the model's safetensors files, and they are dropped again after it. Resident memory is then the
  embeddings, one layer and the activations, whatever the depth. ``empty_model`` builds such a model
  without ever reading the layers.

Keep masks (``torch.ao`` parametrizations, ``gisp_plugin.masking``) are small buffers: they stay
materialised and travel with their layer, and the weight behind a mask (its parametrization's
``original``) is what is stored. Weights are read-only during calibration, so dropping a layer writes
nothing back. ``restore`` puts every layer where it was before (reading it back from disk), so
masking, compaction and saving work on the model as usual afterwards.

We do not reuse accelerate's offloading hooks (``AlignDevicesHook``), which llm-compressor builds on:
they materialise weights inside each submodule's ``forward`` only, while the methods read weights
between forwards (scores of ``|W| * ||X||``) and the masks reparametrise those same weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.models.loading import checkpoint_name, tensor_files

log = logging.getLogger(__name__)

Storage = Literal["cpu", "disk"]
Onload = Literal["off", "cpu", "disk"]


class OnloadError(ValueError):
    """A model that cannot be onloaded as asked (no safetensors checkpoint, names that do not match)."""


def checkpoint_index(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a model folder (sharded or not)."""
    if not any(Path(folder).glob("*.safetensors")):
        raise OnloadError(f"onload=disk reads the layers from safetensors files; {str(folder)!r} has none (use onload=cpu)")
    return tensor_files(folder)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, read straight into its own memory.

    ``safe_open`` maps the whole file: while a tensor is copied out, its mapped pages count as resident
    too, so a 100 MB embedding would briefly cost 200 MB. Reading its byte range costs it once.
    """
    with open(file, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        entry = json.loads(handle.read(header_size))[name]
        if entry["dtype"] not in _DTYPES:
            raise OnloadError(f"onload=disk cannot read {name!r} of dtype {entry['dtype']} from {str(file)!r}; use onload=cpu")
        tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        handle.seek(8 + header_size + start)
        if end > start and handle.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - start:
            raise OnloadError(f"{str(file)!r} ends inside tensor {name!r}; the checkpoint is damaged")
    return tensor


def execution_device(name: str = "auto") -> torch.device:
    """The device a layer runs on: ``auto`` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace tensor ``name`` of ``root`` (a new parameter object: needed between meta and real)."""
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = value


def _move(root: nn.Module, name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Move a real tensor; a parameter keeps its identity (tied weights stay tied)."""
    if tensor.device == device:
        return
    if isinstance(tensor, nn.Parameter):
        tensor.data = tensor.data.to(device)
    else:
        _set_tensor(root, name, tensor.to(device))


class LayerPlacement:
    """Where each decoder layer of ``model`` waits (``storage``) and where it runs (``device``).

    ``prepare`` stores every layer and moves the rest of the model to the execution device; ``onload`` /
    ``offload`` bring one layer in and out; ``restore`` puts everything back where ``prepare`` found it.
    ``checkpoint`` (disk only) is the model's folder; by default the one it was loaded from.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: nn.ModuleList,
        storage: Storage,
        device: torch.device | str = "auto",
        checkpoint: str | Path | None = None,
    ):
        if storage not in ("cpu", "disk"):
            raise OnloadError(f"unknown onload storage {storage!r}; choose cpu or disk")
        self.model, self.layers, self.storage = model, layers, storage
        self.device = execution_device(str(device))
        prefixes = {id(module): path for path, module in model.named_modules()}
        self.prefixes = [prefixes[id(layer)] for layer in layers]
        self._home: dict[str, tuple[torch.device, torch.dtype]] = {}  # tensor name (in model) -> where it was
        self.index: dict[str, Path] = {}
        if storage == "disk":
            folder = checkpoint if checkpoint is not None else getattr(model, "name_or_path", "")
            if not folder or not Path(folder).is_dir():
                raise OnloadError(f"onload=disk needs the model's local folder; got {str(folder)!r} (use onload=cpu)")
            self.index = checkpoint_index(folder)
            missing = [
                name
                for i, layer in enumerate(layers)
                for name, _ in layer.named_parameters(remove_duplicate=False)
                if f"{self.prefixes[i]}.{checkpoint_name(name)}" not in self.index
            ]
            if missing:
                raise OnloadError(
                    f"onload=disk: the checkpoint in {str(folder)!r} stores no tensor for {missing[0]!r} "
                    "(its names differ from the model's, as for converted expert weights); use onload=cpu"
                )

    def _layer_tensors(self, index: int) -> Iterator[tuple[str, torch.Tensor, bool]]:
        """(name in the layer, tensor, is parameter) of every tensor of layer ``index``."""
        layer = self.layers[index]
        for name, parameter in layer.named_parameters(remove_duplicate=False):
            yield name, parameter, True
        for name, buffer in layer.named_buffers(remove_duplicate=False):
            yield name, buffer, False

    def prepare(self) -> None:
        """Store every layer and put the rest of the model (embeddings, norms, rotary tables) on the device."""
        layer_ids = {id(t) for layer in self.layers for t in [*layer.parameters(), *layer.buffers()]}
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if id(tensor) not in layer_ids:
                self._home[name] = (tensor.device, tensor.dtype)
                if tensor.device.type != "meta":
                    _move(self.model, name, tensor, self.device)
        for index in range(len(self.layers)):
            for name, tensor, _ in self._layer_tensors(index):
                self._home[f"{self.prefixes[index]}.{name}"] = (tensor.device, tensor.dtype)
            self.offload(index)

    def _read(self, index: int, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = f"{self.prefixes[index]}.{checkpoint_name(name)}"
        return read_tensor(self.index[key], key).to(device=device, dtype=dtype)

    def _place(self, index: int, device: torch.device | None) -> None:
        """Layer ``index`` onto ``device``, or each tensor back to its home when ``device`` is None."""
        layer = self.layers[index]
        for name, tensor, is_parameter in list(self._layer_tensors(index)):
            home_device, dtype = self._home[f"{self.prefixes[index]}.{name}"]
            target = device or home_device
            if target.type == "meta":  # a weight that was never in memory goes back to disk
                if tensor.device.type != "meta":
                    _set_tensor(layer, name, torch.empty_like(tensor, device="meta"))
            elif is_parameter and self.storage == "disk" and tensor.device.type == "meta":
                _set_tensor(layer, name, self._read(index, name, target, dtype))
            elif tensor.device.type != "meta":
                _move(layer, name, tensor, target)

    def onload(self, index: int) -> nn.Module:
        """Bring layer ``index`` (weights, masks, buffers) to the execution device."""
        self._place(index, self.device)
        return self.layers[index]

    def offload(self, index: int) -> None:
        """Send layer ``index`` back to storage: CPU memory, or (disk) drop its weights."""
        layer = self.layers[index]
        for name, tensor, is_parameter in list(self._layer_tensors(index)):
            if is_parameter and self.storage == "disk":
                if tensor.device.type != "meta":
                    _set_tensor(layer, name, torch.empty_like(tensor, device="meta"))
            elif tensor.device.type != "meta":
                _move(layer, name, tensor, torch.device("cpu"))

    def restore(self) -> None:
        """Every tensor back where ``prepare`` found it: read back from disk, or (a weight that was never
        in memory, as in ``empty_model``) left there."""
        for index in range(len(self.layers)):
            self._place(index, None)
        layer_names = {f"{p}." for p in self.prefixes}
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if name in self._home and not name.startswith(tuple(layer_names)):
                device = self._home[name][0]
                if device.type != "meta" and tensor.device.type != "meta":
                    _move(self.model, name, tensor, device)

    @contextmanager
    def walking(self) -> Iterator[LayerPlacement]:
        """``prepare`` for the duration of a walk, ``restore`` afterwards (also on errors)."""
        self.prepare()
        try:
            yield self
        finally:
            self.restore()


def empty_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM from a local folder whose decoder layers hold no weights (meta tensors) and whose
    other weights (embeddings, final norm, output head) are read from its safetensors files: the
    starting point of ``LayerPlacement(storage="disk")`` for a model larger than memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # rotary tables and other buffers are computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.name_or_path = str(folder)
    index = checkpoint_index(folder)
    in_layers = {id(p) for p in adapter_for(model).decoder_layers(model).parameters()}
    output = model.get_output_embeddings()
    for name, tensor in list(model.named_parameters()):
        if id(tensor) in in_layers:
            continue
        key = name if name in index else None
        if key is None and getattr(config, "tie_word_embeddings", False) and output is not None and tensor is output.weight:
            continue  # tied: shares the embedding's tensor, materialised below through tie_weights
        if key is None:
            raise OnloadError(f"the checkpoint in {str(folder)!r} stores no tensor for {name!r}")
        _set_tensor(model, name, read_tensor(index[key], key).to(dtype=tensor.dtype))
    model.tie_weights()
    return model.eval()
