"""One check for inf and NaN, shared by pruning, statistics and evaluation.

A NaN weight, score, bias or metric never makes a useful result: it makes a model that writes NaN or
a table that reads ``ppl = nan``. Every place that produces one of those stops with ``NonFiniteError``
naming the first offending tensor or metric and what to check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch


class NonFiniteError(FloatingPointError, ValueError):
    """A weight, statistic, score, loss, gradient or metric is inf or NaN; the result would be meaningless."""


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding inf or NaN, or ``None`` when all are finite.

    Quantised tensors (torchao's subclasses) are skipped: their integer data cannot be inf or NaN, they
    implement no ``isfinite``, and the weights they came from were checked before quantisation. Meta
    tensors (layers waiting on disk, ``gisp_plugin.calibration.onloading``) hold no values to check.
    """
    for name, tensor in tensors:
        if type(tensor) is not torch.Tensor or tensor.device.type == "meta" or not tensor.is_floating_point():
            continue
        # in slices: isfinite's temporaries on a whole embedding would cost nearly twice its size
        if not all(bool(torch.isfinite(part).all()) for part in tensor.detach().reshape(-1).split(2**22)):
            return name
    return None


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Refuse a model with inf or NaN parameters (a damaged checkpoint, an overflowed conversion)."""
    name = first_non_finite((n, p.detach()) for n, p in model.named_parameters())
    if name is not None:
        raise NonFiniteError(f"{what}: weight {name} holds inf or NaN; the model files are damaged, reload or re-save them")


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    name = first_non_finite((n, t.detach()) for n, t in tensors.items())
    if name is not None:
        raise NonFiniteError(f"{what}: {name} holds inf or NaN")


def check_scores(scores: Mapping[tuple[int, str], torch.Tensor]) -> None:
    """Refuse structure scores holding NaN or -inf (``+inf`` is how a protected unit is marked)."""
    for (layer, kind), values in sorted(scores.items()):
        values = values.detach()
        if bool(torch.isnan(values).any()) or bool((values == float("-inf")).any()):
            raise NonFiniteError(
                f"scores of {kind} units in layer {layer} hold NaN or -inf; the model's weights or activations "
                "are not finite (check the model files, or use float32)"
            )


def check_finite_metrics(metrics: Mapping[str, float], what: str) -> None:
    """Refuse inf or NaN metrics; standard errors may legitimately be undefined (``nan``) and are skipped."""
    for name, value in metrics.items():
        if "stderr" in name:
            continue
        if not math.isfinite(value):
            raise NonFiniteError(f"{what}: {name} = {value}; the model's outputs are not finite (check its weights and dtype)")
