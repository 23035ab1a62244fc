"""ChannelStats: exact float64 statistics, however the tokens are split into batches."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gisp_plugin.calibration.statistics import ChannelStats


def test_matches_torch_in_float64_on_large_offsets():
    generator = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(5000, 7, generator=generator, dtype=torch.float64)  # variance 1 on a mean of 1e4
    stats = ChannelStats(7)
    for chunk in x.float().split(333):
        stats.update(chunk)
    exact = x.float().double()
    torch.testing.assert_close(stats.mean, exact.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.variance, exact.var(0), rtol=1e-9, atol=0)
    torch.testing.assert_close(stats.squared_norm, exact.square().sum(0), rtol=1e-12, atol=0)
    # the one-pass float32 formula E[x^2] - E[x]^2 is useless here; this is why the engine is float64/Welford
    naive = x.float().square().mean(0) - x.float().mean(0).square()
    assert (naive.double() - exact.var(0)).abs().max() > 0.5


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_batch_splits_and_merges_agree(sizes, seed):
    generator = torch.Generator().manual_seed(seed)
    chunks = [3.0 + 2.0 * torch.randn(n, 4, generator=generator) for n in sizes]
    whole = torch.cat(chunks).double()
    if whole.shape[0] < 2:
        return
    streamed, merged = ChannelStats(4), ChannelStats(4)
    for chunk in chunks:
        streamed.update(chunk)
        part = ChannelStats(4)
        part.update(chunk)
        merged.merge(part)
    for stats in (streamed, merged):
        assert stats.n_tokens == whole.shape[0]
        torch.testing.assert_close(stats.mean, whole.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.variance, whole.var(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.norm, whole.norm(dim=0), rtol=1e-12, atol=1e-12)


def test_bad_shapes_and_too_few_tokens_are_errors():
    stats = ChannelStats(3)
    with pytest.raises(ValueError, match=r"\[tokens, 3\]"):
        stats.update(torch.zeros(2, 4))
    stats.update(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        _ = stats.variance


def test_input_gram_counts_real_tokens_only_and_merges():
    """The recorder's Gram matrix is X^T X over the unpadded tokens; parts merge to the whole."""
    from torch import nn

    from gisp_plugin.calibration.recorder import InputStatsRecorder
    from gisp_plugin.calibration.statistics import InputGram

    torch.manual_seed(0)
    linear = nn.Linear(5, 3)
    x = torch.randn(2, 6, 5)  # [batch, seq, in]
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])  # the second row is padded
    with InputStatsRecorder({"proj": linear}, grams=["proj"]) as recorder:
        recorder.token_mask = mask
        linear(x)
    real = x[mask].double()  # [10, 5]
    gram = recorder.grams["proj"]
    assert gram.n_tokens == 10
    torch.testing.assert_close(gram.gram, real.T @ real, rtol=1e-12, atol=1e-12)
    halves = InputGram(5)
    halves.update(real[:3])
    other = InputGram(5)
    other.update(real[3:])
    halves.merge(other)
    torch.testing.assert_close(halves.gram, gram.gram, rtol=1e-12, atol=1e-12)
