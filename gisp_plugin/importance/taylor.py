"""Element-wise Taylor salience of a weight: the first- and second-order terms of the loss change.

Removing a weight ``W`` changes the loss by about ``-W * g + 0.5 * W * H * W``; with the Fisher
approximation of the Hessian's diagonal, ``H ~ acc = sum_i g_i ** 2 / N`` (the mean of squared
per-sample gradients). The variants, as LLM-Pruner (``LLMPruner/pruner/hf_llama_pruner.py``,
``TaylorImportance``) and GISP's reference (``pruners/grad_sp_global.py``, option ``taylor``) define them:

- ``param_first``: ``W * g``
- ``param_second``: ``W * acc * W``
- ``param_mix``: ``W * g - 0.5 * W * acc * W``
- ``vectorize`` (LLM-Pruner only): ``W * g``, summed over each channel *before* the absolute value

Both methods take the absolute value element by element and sum it over a structure (``vectorize``
sums first); that reduction belongs to each method, this module gives the element-wise term.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

TaylorVariant = Literal["param_first", "param_second", "param_mix", "vectorize"]
SECOND_ORDER = ("param_second", "param_mix")


def needs_squares(variant: str) -> bool:
    """Whether ``variant`` reads the per-sample squared gradients (one sequence per backward)."""
    return variant in SECOND_ORDER


def sharding_refusal(options: Any) -> str | None:
    """Why a method's options cannot score a model sharded with FSDP (``MethodSpec.sharded_refusal``): the
    second-order ``taylor`` variants square each sample's own gradient, which sharded ranks never hold."""
    variant = getattr(options, "taylor", None)
    if variant is not None and needs_squares(variant):
        return f"taylor={variant} squares each sample's own gradients, which no rank holds whole under --fsdp"
    return None


def salience(weight: torch.Tensor, grad: torch.Tensor, acc: torch.Tensor | None, variant: str) -> torch.Tensor:
    """Element-wise Taylor salience (float32, shaped like the weight); ``acc`` for the second-order variants."""
    w = weight.detach().float()
    if variant in ("param_first", "vectorize"):
        return w * grad
    if variant not in SECOND_ORDER:
        raise ValueError(f"unknown taylor variant {variant!r}; choose param_first, param_second, param_mix or vectorize")
    if acc is None:
        raise ValueError(f"taylor={variant!r} needs per-sample squared gradients")
    second = w * acc * w
    if variant == "param_second":
        return second
    return w * grad - 0.5 * second
