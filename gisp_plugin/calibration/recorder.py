"""Forward hooks that accumulate ``ChannelStats`` (and, where asked, ``InputGram``) of chosen modules' inputs,
skipping padding tokens.

``InputStatsRecorder`` hooks any set of modules (``{"model.layers.3.mlp.down_proj": module}``); the
code that drives the forward passes tells it which tokens are real through ``token_mask``; the
sequential engine (``gisp_plugin.calibration.sequential``) drives it one layer at a time.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gisp_plugin.calibration.statistics import ChannelStats, ExpertChannelStats, InputGram
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.finite import NonFiniteError


class InputStatsRecorder:
    """Per-channel statistics of the first positional input of each hooked module.

    Modules named in ``routed`` are stacked routed experts (transformers 5: ``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``, ``act_fn``, called with the hidden states, the chosen experts and their
    router weights): for them the statistics are those of each expert's down-projection input over the
    tokens routed to it (``ExpertChannelStats``), the inputs Wanda-sp and FLAP score inside experts.

    Modules named in ``grams`` also accumulate the Gram matrix of their input over the real tokens
    (``grams[name]``, an ``InputGram``): the layer-wise Hessian of the Optimal-Brain-Surgeon methods.

    Set ``token_mask`` (bool ``[batch, seq]``, True for real tokens) before each forward pass that
    carries padding; ``None`` counts every token. Use as a context manager, or call ``remove``.
    """

    def __init__(self, modules: Mapping[str, nn.Module], routed: Collection[str] = (), grams: Collection[str] = ()):
        self.stats: dict[str, ChannelStats | ExpertChannelStats] = {}
        self.grams: dict[str, InputGram] = {}
        self._gram_names = frozenset(grams)
        self.token_mask: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = [
            module.register_forward_pre_hook(self._expert_hook(name) if name in routed else self._hook(name))
            for name, module in modules.items()
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            sequences = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.unsqueeze(0)  # [seqs, tokens, ch]
            mask = None
            if self.token_mask is not None:
                mask = self.token_mask.to(x.device)
                if mask.numel() != sequences.shape[0] * sequences.shape[1]:
                    raise ValueError(
                        f"token mask of {mask.numel()} tokens does not fit an input of {sequences.shape[0] * sequences.shape[1]}"
                    )
                mask = mask.reshape(sequences.shape[:2])
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(
                    f"the input of {name} holds inf or NaN on the calibration data; check the model's weights, or use float32"
                )
            if name not in self.stats:
                self.stats[name] = ChannelStats(sequences.shape[-1], device=x.device)
            self.stats[name].update_sequences(sequences, None if mask is None or bool(mask.all()) else mask)
            if name in self._gram_names:
                if name not in self.grams:
                    self.grams[name] = InputGram(sequences.shape[-1], device=x.device)
                flat = sequences.reshape(-1, sequences.shape[-1])
                self.grams[name].update(flat if mask is None else flat[mask.reshape(-1)])

        return hook

    def _real_tokens(self, flat: torch.Tensor) -> torch.Tensor:
        """Bool ``[tokens]``: which rows of a flattened input are real tokens."""
        if self.token_mask is None:
            return torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
        mask = self.token_mask.reshape(-1).to(flat.device)
        if mask.numel() != flat.shape[0]:
            raise ValueError(f"token mask of {mask.numel()} tokens does not fit an input of {flat.shape[0]}")
        return mask

    def _expert_hook(self, name: str):
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple) -> None:
            hidden, chosen, weights = args[0], args[1], args[2]  # [T, H], [T, k], [T, k]
            gate_up, down = module.gate_up_proj, module.down_proj  # [E, 2I, H], [E, H, I] (masked, if masks are on)
            if name not in self.stats:
                self.stats[name] = ExpertChannelStats(down.shape[0], down.shape[2], device=hidden.device)
            real = self._real_tokens(hidden)
            for expert in range(down.shape[0]):
                token, slot = torch.where((chosen == expert) & real[:, None])
                if token.numel() == 0:
                    continue
                gate, up = torch.nn.functional.linear(hidden[token], gate_up[expert]).chunk(2, dim=-1)
                inner = module.act_fn(gate) * up  # [tokens, I]: the down projection's input
                output = torch.nn.functional.linear(inner, down[expert])
                saliency = weights[token, slot].double() * output.double().norm(dim=-1)
                self.stats[name].update(expert, inner, saliency)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> InputStatsRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def batch_size_for(calibration: CalibrationSet, batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return min(batch_size, len(calibration))
