"""Context + scored continuation, tokenised the lm-eval way, with the loss mask on the continuation only."""

from __future__ import annotations

import pytest

from gisp_plugin.data.scored_text import encode_pair, scored_sequence


def test_encode_pair_moves_trailing_spaces_into_the_continuation(tokenizer):
    context, continuation = encode_pair(tokenizer, "The answer is ", "pruning")
    assert tokenizer.decode(context) == "The answer is"
    assert tokenizer.decode(continuation) == " pruning"
    assert context + continuation == tokenizer("The answer is pruning")["input_ids"]


def test_mask_covers_exactly_the_continuation_tokens(tokenizer):
    scored = scored_sequence(tokenizer, "Question: which heads go?\nAnswer:", " the weakest ones", seqlen=512)
    assert scored.dropped == 0 and len(scored.ids) == len(scored.mask)
    assert tokenizer.decode(scored.ids[scored.mask]) == " the weakest ones"
    assert tokenizer.decode(scored.ids[~scored.mask]) == "Question: which heads go?\nAnswer:"
    assert scored.mask[-1] and not scored.mask[0]
    assert int(scored.mask.sum()) == len(encode_pair(tokenizer, "Question: which heads go?\nAnswer:", " the weakest ones")[1])


def test_long_context_is_cut_from_the_left(tokenizer):
    context = "calibration text " * 20 + "Answer:"
    full = scored_sequence(tokenizer, context, " yes", seqlen=10_000)
    cut = scored_sequence(tokenizer, context, " yes", seqlen=16)
    assert len(cut.ids) == 16 and cut.dropped == len(full.ids) - 16
    assert cut.ids.tolist() == full.ids[-16:].tolist() and cut.mask.tolist() == full.mask[-16:].tolist()


def test_long_continuation_keeps_half_a_window_of_context_and_its_own_beginning(tokenizer):
    context = "Question: how many heads are pruned in every layer?\nAnswer:"
    continuation = " " + "three heads per layer, " * 20
    full = scored_sequence(tokenizer, context, continuation, seqlen=10_000)
    n_context = int((~full.mask).sum())
    assert n_context > 16
    cut = scored_sequence(tokenizer, context, continuation, seqlen=32)
    assert len(cut.ids) == 32 and int((~cut.mask).sum()) == 16
    assert cut.ids[:16].tolist() == full.ids[n_context - 16 : n_context].tolist()  # the last context tokens
    assert cut.ids[16:].tolist() == full.ids[n_context : n_context + 16].tolist()  # the first answer tokens


def test_empty_context_is_refused(tokenizer):
    with pytest.raises(ValueError, match="non-empty context"):
        scored_sequence(tokenizer, "", " yes", seqlen=8)
