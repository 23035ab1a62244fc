"""Running per-channel statistics of a layer's input over calibration tokens.

Activation-based methods score the input channels of output projections (``o_proj``, ``down_proj``)
by how large (Wanda-sp: squared norm) or how variable (FLAP: variance) they are over the calibration
tokens. ``ChannelStats`` accumulates both in float64, merging batches with Chan's parallel form of
Welford's update, so a variance over a million tokens of large activations loses no precision to the
``E[x^2] - E[x]^2`` cancellation.
"""

from __future__ import annotations

import torch


class ChannelStats:
    """Token count, squared norm, mean and variance per channel of a ``[tokens, channels]`` stream."""

    def __init__(self, channels: int, device: torch.device | str | None = None):
        self.n_tokens = 0
        self.sum_squares = torch.zeros(channels, dtype=torch.float64, device=device)  # [channels]
        self._mean = torch.zeros(channels, dtype=torch.float64, device=device)  # [channels]
        self._m2 = torch.zeros(channels, dtype=torch.float64, device=device)  # sum of squared deviations

    @property
    def channels(self) -> int:
        return self._mean.numel()

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of tokens ``x`` shaped ``[tokens, channels]``."""
        if x.dim() != 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected a [tokens, {self.channels}] tensor, got shape {tuple(x.shape)}")
        n_new = x.shape[0]
        if n_new == 0:
            return
        centred = x.detach().to(device=self._mean.device, dtype=torch.float64, copy=True)
        mean_new = centred.mean(0)
        m2_new = centred.sub_(mean_new).square_().sum(0)
        self.sum_squares += m2_new + n_new * mean_new.square()  # sum x^2 = sum (x - m)^2 + n m^2, both >= 0
        n_old = self.n_tokens
        n = n_old + n_new
        delta = mean_new - self._mean
        self._mean += delta * (n_new / n)
        self._m2 += m2_new + delta.square() * (n_old * n_new / n)
        self.n_tokens = n

    def merge(self, other: ChannelStats) -> None:
        """Fold another accumulator over the same channels into this one."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge statistics of {other.channels} channels into {self.channels}")
        if other.n_tokens == 0:
            return
        n_old, n_new = self.n_tokens, other.n_tokens
        n = n_old + n_new
        delta = other._mean.to(self._mean.device) - self._mean
        self.sum_squares += other.sum_squares.to(self._mean.device)
        self._mean += delta * (n_new / n)
        self._m2 += other._m2.to(self._mean.device) + delta.square() * (n_old * n_new / n)
        self.n_tokens = n

    @property
    def squared_norm(self) -> torch.Tensor:
        """``||X_j||_2^2``: the sum over tokens of each channel's square (float64 ``[channels]``)."""
        return self.sum_squares

    @property
    def norm(self) -> torch.Tensor:
        return self.sum_squares.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance over tokens (divisor ``n - 1``), float64 ``[channels]``."""
        if self.n_tokens < 2:
            raise ValueError(f"a sample variance needs at least 2 tokens, have {self.n_tokens}")
        return self._m2 / (self.n_tokens - 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sum_squares, self._mean, self._m2))

    def __repr__(self) -> str:
        return f"ChannelStats(channels={self.channels}, n_tokens={self.n_tokens})"


class ExpertChannelStats:
    """``ChannelStats`` of the down-projection input of every routed expert, over the tokens routed to it.

    Also accumulates REAP's saliency: for each expert, the sum over its routed tokens of the router
    weight times the L2 norm of the expert's output. The properties stack the experts: ``[E, channels]``.
    """

    def __init__(self, experts: int, channels: int, device: torch.device | str | None = None):
        self.experts = [ChannelStats(channels, device=device) for _ in range(experts)]
        self.saliency_sum = torch.zeros(experts, dtype=torch.float64, device=device)  # [E]

    @property
    def routed_tokens(self) -> torch.Tensor:
        """Tokens routed to each expert, ``[E]``."""
        return torch.tensor([s.n_tokens for s in self.experts], dtype=torch.float64)

    def update(self, expert: int, x: torch.Tensor, saliency: torch.Tensor) -> None:
        """Add the tokens routed to ``expert``: its down-projection input ``x`` ``[tokens, channels]`` and
        each token's router weight times output norm (``saliency`` ``[tokens]``)."""
        self.experts[expert].update(x)
        self.saliency_sum[expert] += saliency.detach().to(self.saliency_sum).sum()

    def merge(self, other: ExpertChannelStats) -> None:
        for mine, theirs in zip(self.experts, other.experts, strict=True):
            mine.merge(theirs)
        self.saliency_sum += other.saliency_sum.to(self.saliency_sum.device)

    def _stack(self, value) -> torch.Tensor:
        return torch.stack([value(s) if s.n_tokens else torch.zeros_like(s.mean) for s in self.experts])

    @property
    def norm(self) -> torch.Tensor:
        return self._stack(lambda s: s.norm)

    @property
    def mean(self) -> torch.Tensor:
        return self._stack(lambda s: s.mean)

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance per expert and channel; an expert routed fewer than 2 tokens has variance 0."""
        return self._stack(lambda s: s.variance if s.n_tokens > 1 else torch.zeros_like(s.mean))

    @property
    def saliency(self) -> torch.Tensor:
        """REAP: mean router-weighted output norm over each expert's routed tokens (0 if never routed)."""
        return self.saliency_sum.cpu() / self.routed_tokens.clamp_min(1)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.experts) + self.saliency_sum.numel() * 8
