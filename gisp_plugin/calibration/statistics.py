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
        self.n_sequences = 0
        self._sum_of_means = torch.zeros(channels, dtype=torch.float64, device=device)  # over sequences
        self._reference_sum = torch.zeros(channels, dtype=torch.float64, device=device)  # see reference_fluctuation
        self._mergeable_reference = True

    @property
    def channels(self) -> int:
        return self._mean.numel()

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of tokens ``x`` shaped ``[tokens, channels]`` (one sequence, for the reference estimate)."""
        if x.dim() != 2 or x.shape[1] != self.channels:
            raise ValueError(f"expected a [tokens, {self.channels}] tensor, got shape {tuple(x.shape)}")
        self.update_sequences(x.unsqueeze(0))

    def update_sequences(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add sequences ``x`` shaped ``[sequences, tokens, channels]``, in calibration order.

        ``token_mask`` (bool ``[sequences, tokens]``) flags real tokens; padding is left out. Each
        sequence's own mean and spread are computed first, then folded into the exact totals (Chan's
        formula) and into FLAP's reference estimate, which needs the sequence boundaries.
        """
        if x.dim() != 3 or x.shape[2] != self.channels:
            raise ValueError(f"expected a [sequences, tokens, {self.channels}] tensor, got shape {tuple(x.shape)}")
        values = x.detach().to(device=self._mean.device, dtype=torch.float64, copy=True)  # [seqs, tokens, channels]
        if token_mask is None:
            mask = None
            lengths = torch.full((values.shape[0],), values.shape[1], dtype=torch.float64, device=values.device)
        else:
            mask = token_mask.to(device=values.device, dtype=torch.bool).reshape(values.shape[:2])
            values.mul_(mask.unsqueeze(-1))
            lengths = mask.sum(1).double()
            if not bool((lengths > 0).all()):  # an all-padding row adds nothing
                values, mask, lengths = values[lengths > 0], mask[lengths > 0], lengths[lengths > 0]
        if values.shape[0] == 0 or values.shape[1] == 0:
            return
        seq_mean = values.sum(1) / lengths.unsqueeze(1)  # [seqs, channels]
        centred = values.sub_(seq_mean.unsqueeze(1))
        if mask is not None:
            centred.mul_(mask.unsqueeze(-1))
        seq_m2 = centred.square_().sum(1)  # [seqs, channels]: each sequence's own squared deviations
        del values, centred

        n_new = int(lengths.sum())
        mean_new = (seq_mean * lengths.unsqueeze(1)).sum(0) / n_new
        m2_new = seq_m2.sum(0) + (lengths.unsqueeze(1) * (seq_mean - mean_new).square()).sum(0)
        self.sum_squares += m2_new + n_new * mean_new.square()  # sum x^2 = sum (x - m)^2 + n m^2, both >= 0
        n_old = self.n_tokens
        n = n_old + n_new
        delta = mean_new - self._mean
        self._mean += delta * (n_new / n)
        self._m2 += m2_new + delta.square() * (n_old * n_new / n)
        self.n_tokens = n

        # FLAP's reference: k-th sequence (1-based) adds (k-1)/k * sum_t (x_t - m_k)^2, m_k the running mean
        # of sequence means including sequence k itself.
        k = self.n_sequences + torch.arange(1, seq_mean.shape[0] + 1, dtype=torch.float64, device=seq_mean.device)
        running = (self._sum_of_means + seq_mean.cumsum(0)) / k.unsqueeze(1)  # [seqs, channels]
        spread = seq_m2 + lengths.unsqueeze(1) * (seq_mean - running).square()
        self._reference_sum += (((k - 1) / k).unsqueeze(1) * spread).sum(0)
        self._sum_of_means += seq_mean.sum(0)
        self.n_sequences += seq_mean.shape[0]

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
        self._mergeable_reference = False  # the reference estimate depends on the order of every sequence

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

    @property
    def reference_fluctuation(self) -> torch.Tensor:
        """FLAP's streaming fluctuation estimate (``fluc_inp`` of ``BiasGPT`` in the reference), float64.

        The reference adds one sequence at a time: after sequence ``k`` (``m_k`` the running mean of the
        sequence means, sequences 1..k) it sets ``f = f * (k - 2) / (k - 1) + sum_t (x_t - m_k)^2 / k``
        with ``f = 0`` after the first sequence (its "old" mean is the same tensor as the updated one).
        Unrolled: ``f = sum_{k>=2} (k - 1) / k * S_k / (N - 1)`` with ``S_k = sum_t (x_t - m_k)^2``. Against
        the exact sample variance it drops the first sequence, down-weights early ones by ``(k-1)/k``,
        and measures each against the mean so far instead of the final mean: not a constant factor.
        """
        if not self._mergeable_reference:
            raise ValueError(
                "the reference fluctuation is defined for sequences added in order, not for merged statistics "
                "(of several parts, such as data-parallel ranks); use fluctuation=exact"
            )
        if self.n_sequences < 2:
            raise ValueError(f"the reference fluctuation needs at least 2 sequences, have {self.n_sequences}")
        return self._reference_sum / (self.n_sequences - 1)

    def nbytes(self) -> int:
        tensors = (self.sum_squares, self._mean, self._m2, self._sum_of_means, self._reference_sum)
        return sum(t.numel() * t.element_size() for t in tensors)

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
    def reference_fluctuation(self) -> torch.Tensor:
        raise ValueError(
            "FLAP's reference fluctuation follows whole calibration sequences, which routed experts do not see; "
            "use fluctuation=exact on mixture-of-experts models"
        )

    @property
    def saliency(self) -> torch.Tensor:
        """REAP: mean router-weighted output norm over each expert's routed tokens (0 if never routed)."""
        return self.saliency_sum.cpu() / self.routed_tokens.clamp_min(1)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.experts) + self.saliency_sum.numel() * 8


class InputGram:
    """``sum over tokens of x x^T`` of a ``[tokens, channels]`` stream (float64 ``[channels, channels]``).

    The Hessian of a linear layer's squared output error is twice this matrix (SparseGPT, SlimGPT); a
    sum, not a mean, so that batches and data-parallel ranks combine exactly with ``merge``.
    """

    def __init__(self, channels: int, device: torch.device | str | None = None):
        self.n_tokens = 0
        self.gram = torch.zeros(channels, channels, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add the tokens ``x`` shaped ``[tokens, channels]``."""
        if x.dim() != 2 or x.shape[1] != self.gram.shape[0]:
            raise ValueError(f"expected a [tokens, {self.gram.shape[0]}] tensor, got shape {tuple(x.shape)}")
        values = x.detach().to(device=self.gram.device, dtype=torch.float64)
        self.gram.addmm_(values.T, values)
        self.n_tokens += values.shape[0]

    def merge(self, other: InputGram) -> None:
        """Fold another accumulator over the same channels into this one."""
        if other.gram.shape != self.gram.shape:
            raise ValueError(f"cannot merge a Gram matrix of {other.gram.shape[0]} channels into {self.gram.shape[0]}")
        self.gram += other.gram.to(self.gram.device)
        self.n_tokens += other.n_tokens

    def nbytes(self) -> int:
        return self.gram.numel() * self.gram.element_size()
