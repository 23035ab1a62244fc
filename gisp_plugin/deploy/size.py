"""Size on disk of a model's weights, and bytes per parameter: what a user pays to ship it."""

from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import PreTrainedModel


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the safetensors weight files in ``folder`` (config, tokenizer and card not counted)."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def serialized_bytes(model: PreTrainedModel) -> int:
    """Bytes of ``model``'s weights as ``save_pretrained`` writes them (safetensors), measured by writing them."""
    with tempfile.TemporaryDirectory(prefix="gisp-size-") as tmp:
        model.save_pretrained(tmp)
        return weights_bytes(tmp)


def size_metrics(size_bytes: int, params: int) -> dict[str, float]:
    """The table columns: size in MiB and bytes per (logical, unquantised-count) parameter."""
    return {"size_mib": size_bytes / 2**20, "bytes_per_param": size_bytes / params}
