"""The shared gradient engine against plain autograd: sums, per-sample squares, batching, dtype, hygiene."""

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.importance.gradients import NonFiniteError, accumulate_gradients, weight_paths, weight_tensor
from gisp_plugin.importance.losses import NTP
from gisp_plugin.masking.masked_model import MaskedModel
from tests.tiny import random_ids, tiny_model


def ragged_set(n: int = 5, seed: int = 0) -> tuple[CalibrationSet, list[torch.Tensor]]:
    ids = random_ids(n, 14, seed=seed)
    sequences = [ids[i, : 8 + i] for i in range(n)]  # different lengths: batches get padded
    return CalibrationSet("random", sequences), sequences


def per_sample_grads(model, sequences, paths):
    """d(mean token CE of sequence i)/dW for every sequence, by plain autograd, one at a time."""
    out = []
    for seq in sequences:
        model.zero_grad()
        model(seq[None], labels=seq[None]).loss.backward()
        out.append({p: model.get_parameter(p).grad.detach().clone() for p in paths})
    model.zero_grad()
    return out


def test_sum_is_mean_gradient_and_squares_match_autograd(family):
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    calibration, sequences = ragged_set()
    paths = weight_paths(anatomy)
    sums = accumulate_gradients(model, paths, calibration, NTP, batch_size=1, per_sample_squares=True)
    expected = per_sample_grads(model, sequences, paths)
    n = len(sequences)
    assert sums.n_samples == n and sums.n_tokens == sum(len(s) for s in sequences)
    for path in paths:
        mean = sum(g[path] for g in expected) / n
        acc = sum(g[path] ** 2 for g in expected) / n
        torch.testing.assert_close(sums.grad[path], mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sums.grad_sq[path], acc, rtol=1e-5, atol=1e-9)


def test_padded_batches_and_checkpointing_give_the_same_gradient(family):
    model = tiny_model(family)
    paths = weight_paths(adapter_for(model).anatomy(model))
    calibration, _ = ragged_set()
    one = accumulate_gradients(model, paths, calibration, NTP, batch_size=1)
    padded = accumulate_gradients(model, paths, calibration, NTP, batch_size=3, pad_token_id=7)
    checkpointed = accumulate_gradients(model, paths, calibration, NTP, batch_size=2, gradient_checkpointing=True)
    for path in paths:
        torch.testing.assert_close(padded.grad[path], one.grad[path], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(checkpointed.grad[path], one.grad[path], rtol=1e-5, atol=1e-7)
    assert one.loss == pytest.approx(padded.loss, rel=1e-6)
    assert all(not layer.training and not layer.gradient_checkpointing for layer in model.model.layers)


def test_partial_sums_merge_to_the_whole_set():
    model = tiny_model("qwen2")
    paths = weight_paths(adapter_for(model).anatomy(model))
    calibration, sequences = ragged_set(6)
    whole = accumulate_gradients(model, paths, calibration, NTP)
    weights = NTP.sample_weights(calibration)
    first = CalibrationSet("a", sequences[:4])
    second = CalibrationSet("b", sequences[4:])
    merged = accumulate_gradients(model, paths, first, NTP, sample_weights=weights[:4])
    merged.merge(accumulate_gradients(model, paths, second, NTP, sample_weights=weights[4:]))
    assert merged.n_samples == whole.n_samples == 6
    assert merged.loss == pytest.approx(whole.loss, rel=1e-6)
    for path in paths:
        torch.testing.assert_close(merged.grad[path], whole.grad[path], rtol=1e-5, atol=1e-7)


def test_only_prunable_weights_get_gradients_and_flags_are_restored():
    model = tiny_model("llama")
    model.model.norm.weight.requires_grad_(False)  # a caller's own flag must survive
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    paths = weight_paths(adapter_for(model).anatomy(model))
    seen = []
    handles = [p.register_hook(lambda g, name=name: seen.append(name)) for name, p in model.named_parameters() if p.requires_grad]
    accumulate_gradients(model, paths, ragged_set()[0], NTP)
    for handle in handles:
        handle.remove()
    assert set(seen) == set(paths)  # embeddings, lm_head, norms and biases never got a gradient
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_bf16_model_accumulates_in_float32():
    model32 = tiny_model("mistral")
    model16 = tiny_model("mistral").to(torch.bfloat16)
    paths = weight_paths(adapter_for(model32).anatomy(model32))
    calibration, _ = ragged_set()
    exact = accumulate_gradients(model32, paths, calibration, NTP)
    low = accumulate_gradients(model16, paths, calibration, NTP)
    for path in paths:
        assert low.grad[path].dtype == torch.float32
        assert weight_tensor(model16, path).dtype == torch.bfloat16
        cosine = torch.nn.functional.cosine_similarity(low.grad[path].flatten(), exact.grad[path].flatten(), dim=0)
        assert cosine > 0.97, path


def test_non_finite_loss_stops_with_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 0] = float("nan")
    paths = weight_paths(adapter_for(model).anatomy(model))
    with pytest.raises(NonFiniteError, match="calibration loss is not finite .* samples 0..1"):
        accumulate_gradients(model, paths, ragged_set()[0], NTP)
    assert all(p.grad is None for p in model.parameters())


def test_wrong_number_of_sample_weights_is_an_error():
    model = tiny_model("llama")
    paths = weight_paths(adapter_for(model).anatomy(model))
    with pytest.raises(ValueError, match=r"sample weights need shape \(5,\)"):
        accumulate_gradients(model, paths, ragged_set()[0], NTP, sample_weights=torch.ones(3))


def test_masked_weights_get_the_masked_gradient_with_and_without_checkpointing():
    model = tiny_model("qwen2")
    anatomy = adapter_for(model).anatomy(model)
    paths = weight_paths(anatomy)
    calibration, _ = ragged_set()
    keep = KeepMask.dense(anatomy)
    heads = keep[1, "attn_head"].clone()
    heads[[0, 4]] = False
    keep[1, "attn_head"] = heads
    with MaskedModel(model, anatomy) as masked:
        masked.apply(keep)
        plain = accumulate_gradients(model, paths, calibration, NTP, batch_size=2)
        checkpointed = accumulate_gradients(model, paths, calibration, NTP, batch_size=3, gradient_checkpointing=True)
    d = model.model.layers[1].self_attn.head_dim
    q, o = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    for head in (0, 4):
        assert torch.all(plain.grad[q][head * d : (head + 1) * d] == 0)
        assert torch.all(plain.grad[o][:, head * d : (head + 1) * d] == 0)
    assert plain.grad[q][d : 2 * d].abs().sum() > 0
    for path in paths:
        torch.testing.assert_close(checkpointed.grad[path], plain.grad[path], rtol=1e-5, atol=1e-7)
