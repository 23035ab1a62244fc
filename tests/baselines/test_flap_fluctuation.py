"""FLAP's `fluctuation=reference`: the reference code's streaming estimate, checked against its recurrence.

``reference_recurrence`` below is written from the update rule of ``BiasGPT.add_batch`` in
CASIA-IVA-Lab/FLAP (``lib/layerwrapper.py``), one sequence per call as ``prune_flap`` feeds it, kept
step by step (including the "old" mean being the same tensor as the updated one), so the closed form
in ``ChannelStats`` is tested against the rule itself, not against a second copy of the closed form.
"""

import pytest
import torch
from gisp_baselines.channels import fluctuation_channel_scores

from gisp_plugin.calibration.statistics import ChannelStats
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.pruning import run_method
from tests.baselines.independent import calibration_ids
from tests.tiny import tiny_model


def reference_recurrence(sequences: torch.Tensor) -> torch.Tensor:
    """``sequences`` [N, tokens, channels] -> the reference's ``fluc_inp`` after all N, step by step."""
    channels = sequences.shape[2]
    baseline = torch.zeros(channels, dtype=torch.float64)
    fluc = None
    nsamples = 0
    for sequence in sequences:
        inp = sequence.t()  # [channels, tokens]
        old_baseline = baseline  # the same tensor: the in-place updates below change it too
        baseline *= nsamples / (nsamples + 1)
        baseline += inp.mean(1) / (nsamples + 1)
        if nsamples == 0:
            fluc = 0
        else:
            fluc *= (nsamples - 1) / (nsamples + 1 - 1)
            fluc += ((inp - baseline.unsqueeze(1)) * (inp - old_baseline.unsqueeze(1))).sum(1) / (nsamples + 1)
        nsamples += 1  # noqa: SIM113 - the reference's own counter, kept as it is written
    return fluc


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_streaming_estimate_matches_the_reference_recurrence(batch):
    generator = torch.Generator().manual_seed(0)
    sequences = 2.0 + torch.randn(8, 5, 6, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 3, 6)
    stats = ChannelStats(6)
    for chunk in sequences.split(batch):
        stats.update_sequences(chunk)
    torch.testing.assert_close(stats.reference_fluctuation, reference_recurrence(sequences), rtol=1e-12, atol=1e-12)
    # ... and it is not the exact variance up to one constant per layer (the old docstring's claim)
    ratio = stats.reference_fluctuation / stats.variance
    assert float(ratio.max() - ratio.min()) > 0.05


def test_padding_is_left_out_of_the_estimate():
    generator = torch.Generator().manual_seed(1)
    sequences = torch.randn(4, 5, 3, generator=generator, dtype=torch.float64)
    padded = torch.cat([sequences, 100 * torch.ones(4, 2, 3, dtype=torch.float64)], dim=1)
    mask = torch.cat([torch.ones(4, 5, dtype=torch.bool), torch.zeros(4, 2, dtype=torch.bool)], dim=1)
    plain, masked = ChannelStats(3), ChannelStats(3)
    plain.update_sequences(sequences)
    masked.update_sequences(padded, mask)
    torch.testing.assert_close(masked.reference_fluctuation, plain.reference_fluctuation, rtol=1e-12, atol=0)
    torch.testing.assert_close(masked.variance, plain.variance, rtol=1e-12, atol=0)


def test_too_few_sequences_and_merged_statistics_are_errors():
    stats = ChannelStats(2)
    stats.update(torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2 sequences, have 1"):
        _ = stats.reference_fluctuation
    stats.merge(stats_of(torch.randn(4, 2)))
    with pytest.raises(ValueError, match="not for merged statistics"):
        _ = stats.reference_fluctuation


def stats_of(x):
    stats = ChannelStats(x.shape[1])
    stats.update(x)
    return stats


def test_channel_scores_use_the_chosen_estimate():
    generator = torch.Generator().manual_seed(2)
    stats = ChannelStats(4)
    stats.update_sequences(torch.randn(3, 6, 4, generator=generator, dtype=torch.float64))
    weight = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    exact = fluctuation_channel_scores(weight, stats, "WIFV")
    reference = fluctuation_channel_scores(weight, stats, "WIFV", "reference")
    torch.testing.assert_close(exact, stats.variance * weight.square().sum(0))
    torch.testing.assert_close(reference, stats.reference_fluctuation * weight.square().sum(0))
    with pytest.raises(ValueError, match="unknown FLAP fluctuation 'streaming'"):
        fluctuation_channel_scores(weight, stats, "WIFV", "streaming")


def test_flap_option_selects_the_reference_estimate():
    model = tiny_model("llama")
    calibration = CalibrationSet("ids", list(calibration_ids(8)))
    exact = next(run_method(model, None, "flap", [0.3], {"batch_size": "2"}, calibration))
    reference = next(run_method(model, None, "flap", [0.3], {"fluctuation": "reference", "batch_size": "3"}, calibration))
    assert reference.info["fluctuation"] == "reference" and "fluctuation" not in exact.info
    assert abs(reference.sparsity - exact.sparsity) < 0.05
