"""Quantise a (pruned) model with torchao, and say up front which choices this device can run.

The choices are torchao's own configs under the short names its users know:

- ``int8wo``: ``Int8WeightOnlyConfig``, int8 weights with one scale per output row (CPU and CUDA);
- ``int8dq``: ``Int8DynamicActivationInt8WeightConfig``, int8 weights and per-token int8 activations (CPU, CUDA);
- ``int4wo``: ``Int4WeightOnlyConfig`` with ``group_size`` (default 64, which divides the MLP widths that
  CUDA compaction pads to multiples of 64), tile-packed for the tinygemm kernel in torch (CUDA, bfloat16);
- ``fp8dq``: ``Float8DynamicActivationFloat8WeightConfig`` (CUDA with compute capability >= 8.9, bfloat16).

Only the linear layers of the decoder are quantised; embeddings and the LM head stay as they are (what
transformers' ``TorchAoConfig`` also leaves alone by default). Zero-size projections of fully pruned blocks
have nothing to quantise and stay plain, and ``int4wo`` leaves a layer whose input width ``group_size``
does not divide in full precision (torchao logs it). ``GatheredLinear`` (uneven grouped-query attention)
is an ``nn.Linear`` whose forward calls ``F.linear`` and then gathers rows, so its quantised weight runs
through torchao's kernel and the gather is untouched.

The model gets ``config.quantization_config = TorchAoConfig(...)`` and the matching transformers quantizer,
which is what ``from_pretrained(..., quantization_config=TorchAoConfig(...))`` leaves behind: so
``save_pretrained`` writes safetensors (torchao's flattened tensors plus metadata) and plain transformers,
or ``load_pruned``, reload the quantised weights as they were saved.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from gisp_plugin.deploy.import_noise import quiet_torchao_import

log = logging.getLogger(__name__)

# name -> (torchao config class, what it needs)
CHOICES = {
    "int8wo": ("Int8WeightOnlyConfig", "CPU or CUDA"),
    "int8dq": ("Int8DynamicActivationInt8WeightConfig", "CPU or CUDA"),
    "int4wo": ("Int4WeightOnlyConfig", "CUDA, bfloat16"),
    "fp8dq": ("Float8DynamicActivationFloat8WeightConfig", "CUDA with compute capability >= 8.9, bfloat16"),
}
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 64
BFLOAT16_ONLY = ("int4wo", "fp8dq")


class QuantizationError(ValueError):
    """A quantisation choice that is unknown, badly written, or that this device cannot run."""


@dataclass(frozen=True)
class QuantChoice:
    """One quantisation choice: ``int8wo``, ``int8dq``, ``int4wo`` (with its group size) or ``fp8dq``."""

    name: str
    group_size: int | None = None

    @property
    def label(self) -> str:
        """The text that names it in tables and folder names (parses back to the same choice)."""
        if self.group_size is not None and self.group_size != DEFAULT_INT4_GROUP_SIZE:
            return f"{self.name}:group_size={self.group_size}"
        return self.name

    @property
    def slug(self) -> str:
        """The label as it goes into a folder name: ``int8wo``, ``int4wo-g32``."""
        return self.label.replace(":group_size=", "-g")


def parse_quantization(text: str) -> QuantChoice:
    """``int8wo``, ``int8dq``, ``fp8dq``, ``int4wo`` or ``int4wo:group_size=N``; one clear error otherwise."""
    name, _, options = text.strip().partition(":")
    if name not in CHOICES:
        raise QuantizationError(f"unknown quantisation {name!r}; choose one of {', '.join(CHOICES)}")
    group_size = None
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if name != "int4wo" or key != "group_size":
            raise QuantizationError(f"quantisation {name!r} has no option {key!r}; only int4wo takes group_size=N")
        if not value.isdigit() or int(value) not in INT4_GROUP_SIZES:
            raise QuantizationError(f"int4wo group_size {value!r} must be one of {', '.join(map(str, INT4_GROUP_SIZES))}")
        group_size = int(value)
    if name == "int4wo" and group_size is None:
        group_size = DEFAULT_INT4_GROUP_SIZE
    return QuantChoice(name, group_size)


def runnable_choices(device: str | torch.device) -> list[str]:
    """The quantisation choices torchao runs on ``device`` (checked on this machine)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["int8wo", "int8dq"]
    choices = ["int8wo", "int8dq", "int4wo"]
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9):
        choices.append("fp8dq")
    return choices


def check_quantization(text: str | None, device: str | torch.device, dtype: str | torch.dtype) -> QuantChoice | None:
    """Parse ``text`` and check that torchao is installed and can run it on ``device`` in ``dtype``.

    Called before any model is loaded, so a choice that cannot run fails at once, naming what can.
    """
    if text is None:
        return None
    from gisp_plugin.models.loading import parse_dtype

    choice = parse_quantization(text)
    if importlib.util.find_spec("torchao") is None:
        raise QuantizationError("quantisation needs torchao: pip install 'torchao>=0.18,<0.19'")
    runnable = runnable_choices(device)
    if choice.name not in runnable:
        raise QuantizationError(
            f"quantisation {choice.name!r} cannot run on {torch.device(device)} (it needs {CHOICES[choice.name][1]}); "
            f"this device runs: {', '.join(runnable)}"
        )
    if choice.name in BFLOAT16_ONLY and parse_dtype(dtype) != torch.bfloat16:
        raise QuantizationError(f"quantisation {choice.name!r} runs on bfloat16 models; give --dtype bfloat16")
    return choice


def import_torchao() -> Any:
    """``torchao.quantization``, imported without its CUDA-library warnings on CPU machines."""
    quiet_torchao_import()
    import torchao.quantization

    return torchao.quantization


def torchao_config(choice: QuantChoice) -> Any:
    """The torchao config object for a choice."""
    tq = import_torchao()

    if choice.name == "int8wo":
        return tq.Int8WeightOnlyConfig()
    if choice.name == "int8dq":
        return tq.Int8DynamicActivationInt8WeightConfig()
    if choice.name == "int4wo":
        return tq.Int4WeightOnlyConfig(group_size=choice.group_size, int4_packing_format="tile_packed_to_4d")
    return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow())


def _quantizable(module: nn.Module, fqn: str) -> bool:
    """Decoder linear layers that hold weights (a fully pruned block's projections have none)."""
    return isinstance(module, nn.Linear) and module.weight.numel() > 0


def quantize_model(model: PreTrainedModel, choice: QuantChoice) -> PreTrainedModel:
    """Quantise the decoder's linear layers of ``model`` in place and mark it quantised for ``save_pretrained``."""
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    config = torchao_config(choice)
    import_torchao().quantize_(model.model.layers, config, filter_fn=_quantizable)
    quantization_config = TorchAoConfig(quant_type=config)
    model.config.quantization_config = quantization_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)
    log.info("quantised the decoder linear layers with torchao %s (%s)", type(config).__name__, choice.label)
    return model


def quantized_copy(model: PreTrainedModel, choice: QuantChoice) -> PreTrainedModel:
    """A quantised deep copy; ``model`` itself stays unquantised (for several choices of one model)."""
    return quantize_model(copy.deepcopy(model), choice)


def quantization_of(model: PreTrainedModel) -> str | None:
    """The torchao config name of a quantised model, ``None`` for a plain one."""
    config = getattr(model.config, "quantization_config", None)
    if config is None:
        return None
    quant_type = config.quant_type if hasattr(config, "quant_type") else config.get("quant_type")
    if isinstance(quant_type, dict):  # as read back from config.json
        return quant_type.get("default", {}).get("_type")
    return type(quant_type).__name__


def quantization_info(choice: QuantChoice) -> dict[str, Any]:
    """What the pruning record and the model card say about a quantisation."""
    return {"name": choice.label, "config": CHOICES[choice.name][0], "modules": "decoder linear layers"}


def parse_row_quantizations(
    entries: list[str], methods: list[str], device: str | torch.device, dtype: str | torch.dtype
) -> dict[str, list[QuantChoice]]:
    """``METHOD:QUANT`` entries of a comparison (``dense:int8wo``, ``gisp:int4wo:group_size=32``) by method,
    each checked against the methods compared and against what ``device`` runs."""
    by_method: dict[str, list[QuantChoice]] = {}
    for entry in entries:
        method, sep, quant = entry.partition(":")
        if not sep or not quant:
            raise QuantizationError(f"quantisation row {entry!r} must be METHOD:QUANT, e.g. gisp:int8wo or dense:int8wo")
        if method != "dense" and method not in methods:
            raise QuantizationError(
                f"quantisation row {entry!r} names method {method!r}, which is not compared; choose dense or one of "
                f"{', '.join(methods)}"
            )
        choice = check_quantization(quant, device, dtype)
        if choice not in by_method.setdefault(method, []):
            by_method[method].append(choice)
    return by_method
