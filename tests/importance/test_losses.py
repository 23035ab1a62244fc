"""Loss plugins: what each one scores, its set-wide weights, and the margin gradient as two separate passes."""

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.importance.gradients import accumulate_gradients, weight_paths
from gisp_plugin.importance.losses import ANSWER_NTP, MARGIN, NTP, CalibrationDataError
from gisp_plugin.plugins.manager import lookup, registered
from tests.tiny import random_ids, tiny_model


def multiple_choice_set() -> CalibrationSet:
    """Three questions with 3, 2 and 3 options; each option its own sequence, scored on its last tokens."""
    ids = random_ids(8, 12, seed=3)
    lengths = [12, 10, 11, 9, 12, 8, 10, 11]
    option_tokens = [3, 2, 4, 2, 3, 1, 2, 3]
    polarity = [1, -1, -1, -1, 1, -1, 1, -1]
    sequences, masks = [], []
    for row, (length, k) in enumerate(zip(lengths, option_tokens, strict=True)):
        sequences.append(ids[row, :length])
        mask = torch.zeros(length, dtype=torch.bool)
        mask[length - k :] = True
        masks.append(mask)
    return CalibrationSet("mc", sequences, masks, polarity)


def test_losses_are_registered_plugins():
    assert {"ntp", "margin", "answer_ntp"} <= set(registered("loss"))
    assert lookup("loss", "margin") is MARGIN


def test_per_sample_losses_match_transformers(family):
    model = tiny_model(family)
    calibration = multiple_choice_set()
    batch = next(calibration.batches(8))
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        ntp = NTP.per_sample(logits, batch)
        answer = ANSWER_NTP.per_sample(logits, batch)
        for row, (seq, mask) in enumerate(zip(calibration.sequences, calibration.loss_masks, strict=True)):
            full = model(seq[None], labels=seq[None]).loss
            labels = torch.where(mask, seq, torch.full_like(seq, -100))
            only_answer = model(seq[None], labels=labels[None]).loss
            torch.testing.assert_close(ntp[row], full, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(answer[row], only_answer, rtol=1e-5, atol=1e-6)


def test_margin_gradient_is_the_difference_of_two_separate_passes():
    model = tiny_model("mistral")
    paths = weight_paths(adapter_for(model).anatomy(model))
    calibration = multiple_choice_set()
    margin = accumulate_gradients(model, paths, calibration, MARGIN, batch_size=3)

    def part(sign: int) -> CalibrationSet:
        rows = [i for i, p in enumerate(calibration.polarity) if p == sign]
        return CalibrationSet(f"pol{sign}", [calibration.sequences[i] for i in rows], [calibration.loss_masks[i] for i in rows])

    positive = accumulate_gradients(model, paths, part(1), ANSWER_NTP, batch_size=1)  # g_pos / n_pos
    negative = accumulate_gradients(model, paths, part(-1), ANSWER_NTP, batch_size=1)  # g_neg / n_neg
    assert (positive.n_samples, negative.n_samples) == (3, 5)
    for path in paths:
        torch.testing.assert_close(margin.grad[path], positive.grad[path] - negative.grad[path], rtol=1e-5, atol=1e-7)
    assert margin.loss == pytest.approx(positive.loss - negative.loss, rel=1e-5)


def test_weights_over_the_whole_set():
    calibration = multiple_choice_set()
    torch.testing.assert_close(
        MARGIN.sample_weights(calibration), torch.tensor([1 / 3, -0.2, -0.2, -0.2, 1 / 3, -0.2, 1 / 3, -0.2], dtype=torch.float64)
    )
    torch.testing.assert_close(NTP.sample_weights(calibration), torch.full((8,), 1 / 8, dtype=torch.float64))
    # a sequence whose only scored token is the first one predicts nothing: it is skipped, not averaged in
    masks = [torch.tensor([True, False, False]), torch.tensor([False, True, True])]
    qa = CalibrationSet("qa", [torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7])], masks)
    torch.testing.assert_close(ANSWER_NTP.sample_weights(qa), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_margin_on_text_is_a_clear_error():
    text = CalibrationSet("text", [random_ids(1, 10)[0]])
    with pytest.raises(CalibrationDataError, match="needs multiple-choice data with correct and wrong options"):
        MARGIN.sample_weights(text)
    nothing = CalibrationSet("prompts", [torch.tensor([4, 5, 6])], [torch.zeros(3, dtype=torch.bool)])
    with pytest.raises(CalibrationDataError, match="no sequence of 'prompts' has a token to predict"):
        ANSWER_NTP.sample_weights(nothing)
