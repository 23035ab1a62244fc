"""Size on disk of a model's weights, and bytes per parameter: what a user pays to ship it."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the safetensors weight files in ``folder`` (config, tokenizer and card not counted)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def serialized_bytes(model: PreTrainedModel) -> int:
    """Bytes of the tensors ``save_pretrained`` writes for ``model`` (the safetensors file less its small header),
    counted without writing anything: a quantised model's tensors as its quantizer flattens them for
    safetensors (int8 data, scales, zero points), tied weights once."""
    quantizer = getattr(model, "hf_quantizer", None)
    state = quantizer.get_state_dict_and_metadata(model)[0] if quantizer is not None else model.state_dict()
    unique = {(t.data_ptr(), t.dtype, tuple(t.shape)): t for t in state.values() if t.numel()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def size_metrics(size_bytes: int, params: int) -> dict[str, float]:
    """The table columns: size in MiB and bytes per (logical, unquantised-count) parameter."""
    return {"size_mib": size_bytes / 2**20, "bytes_per_param": size_bytes / params}
