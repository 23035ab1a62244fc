"""Sequential calibration agrees with plain full-model passes, and holds one layer's activations."""

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.calibration.sequential import SequentialCalibration, capture_layer_inputs
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.masking.masked_model import MaskedModel
from tests.calibration.full_passes import collect_input_statistics
from tests.tiny import SEPARATE_FAMILIES, tiny_model, with_attention

MODULES = ("self_attn.o_proj", "mlp.down_proj")


def ragged_calibration(lengths=(20, 11, 30, 7, 25), seed=0) -> CalibrationSet:
    generator = torch.Generator().manual_seed(seed)
    return CalibrationSet("ragged", [torch.randint(3, 320, (n,), generator=generator) for n in lengths])


def full_paths(model, layers):
    return [f"model.layers.{i}.{m}" for i in layers for m in MODULES]


def assert_same_stats(got, expected):
    assert got.n_tokens == expected.n_tokens
    torch.testing.assert_close(got.mean, expected.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.variance, expected.variance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.squared_norm, expected.squared_norm, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("family", "attn"), with_attention(SEPARATE_FAMILIES))
def test_dense_propagation_equals_full_passes_with_padding(family, attn):
    model = tiny_model(family, attn=attn)
    calibration = ragged_calibration()
    expected = collect_input_statistics(model, calibration, full_paths(model, range(3)), batch_size=2)
    walk = SequentialCalibration(model, model.model.layers, calibration, MODULES, batch_size=3, propagate="dense", progress=False)
    seen = []
    for layer_stats in walk:
        seen.append(layer_stats.index)
        for path, stats in layer_stats.stats.items():
            assert stats.n_tokens == calibration.num_tokens  # padding never counted
            assert_same_stats(stats, expected[f"model.layers.{layer_stats.index}.{path}"])
    assert seen == [0, 1, 2]


def test_each_layer_gets_its_own_mask_kind():
    # layer 0 full attention, layers 1-2 a 4-token sliding window: reusing layer 0's mask would differ
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    calibration = ragged_calibration((24, 24, 24))
    expected = collect_input_statistics(model, calibration, full_paths(model, range(3)), batch_size=3)
    walk = SequentialCalibration(model, model.model.layers, calibration, MODULES, propagate="dense", progress=False)
    for layer_stats in walk:
        for path, stats in layer_stats.stats.items():
            assert_same_stats(stats, expected[f"model.layers.{layer_stats.index}.{path}"])


def test_pruned_propagation_calibrates_each_layer_on_the_pruned_layers_before_it():
    model = tiny_model("mistral")
    anatomy = adapter_for(model).anatomy(model)
    calibration = ragged_calibration()
    generator = torch.Generator().manual_seed(1)
    final = KeepMask.dense(anatomy)
    for key in final.flags:
        final[key] = torch.rand(final[key].shape, generator=generator) < 0.6

    def upto(layer: int) -> KeepMask:  # the final decision on layers < layer, dense after
        keep = KeepMask.dense(anatomy)
        for (i, kind), flags in final.flags.items():
            if i < layer:
                keep[i, kind] = flags
        return keep

    masked = MaskedModel(model, anatomy)
    try:
        expected = {}
        for i in range(3):
            masked.apply(upto(i))
            expected[i] = collect_input_statistics(model, calibration, full_paths(model, [i]), batch_size=2)
        masked.apply(KeepMask.dense(anatomy))
        walk = SequentialCalibration(model, model.model.layers, calibration, MODULES, propagate="pruned", progress=False)
        for layer_stats in walk:
            i = layer_stats.index
            for path, stats in layer_stats.stats.items():
                assert_same_stats(stats, expected[i][f"model.layers.{i}.{path}"])
            masked.apply(upto(i + 1))  # the caller's decision for layer i
    finally:
        masked.release()


def test_held_activations_do_not_grow_with_depth():
    calibration = ragged_calibration((16,) * 6)
    peaks = {}
    for layers in (2, 6):
        model = tiny_model("llama", layers=layers)
        walk = SequentialCalibration(model, model.model.layers, calibration, MODULES, batch_size=2, progress=False)
        for _ in walk:
            pass
        peaks[layers] = walk.peak_bytes
    one_layer = 6 * 16 * 48 * 4  # the calibration set's hidden states for one layer, float32
    assert peaks[2] == peaks[6]
    assert one_layer <= peaks[6] < 2 * one_layer + 6 * 16 * 16 * 8 * 4  # plus one batch output and the masks


def test_capture_restores_the_layers_even_when_the_forward_fails():
    model = tiny_model("llama")
    calibration = ragged_calibration((8, 8))
    inputs = capture_layer_inputs(model, model.model.layers, calibration, batch_size=1)
    assert [h.shape for h in inputs.hidden] == [torch.Size([1, 8, 48])] * 2
    assert all(len(per_layer) == 2 for per_layer in inputs.kwargs)
    assert all("forward" not in vars(layer) for layer in model.model.layers)

    broken = CalibrationSet("broken", [torch.tensor([3, 4, 10_000])])  # id beyond the vocabulary
    with pytest.raises(IndexError):
        capture_layer_inputs(model, model.model.layers, broken)
    assert all("forward" not in vars(layer) for layer in model.model.layers)
