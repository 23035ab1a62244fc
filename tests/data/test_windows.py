"""Random token windows: exact length, deterministic per seed, the reference loaders' draws."""

from __future__ import annotations

import random

import pytest
import torch

from gisp_plugin.data.windows import CorpusTooShortError, document_windows, stream_windows, token_stream


def test_stream_windows_have_exact_length_and_are_slices_of_the_stream():
    stream = torch.arange(1000)
    windows = stream_windows(stream, n_samples=20, seqlen=37, seed=3)
    assert len(windows) == 20
    for window in windows:
        assert window.shape == (37,)
        assert torch.equal(window, torch.arange(int(window[0]), int(window[0]) + 37))  # a contiguous slice


def test_stream_windows_are_deterministic_per_seed_and_differ_across_seeds():
    stream = torch.arange(5000)
    first = stream_windows(stream, 8, 64, seed=0)
    again = stream_windows(stream, 8, 64, seed=0)
    other = stream_windows(stream, 8, 64, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert [int(w[0]) for w in first] != [int(w[0]) for w in other]


def test_stream_windows_draw_the_reference_offsets_without_touching_global_random_state():
    stream = torch.arange(3000)
    random.seed(123)
    before = random.random()
    random.seed(123)
    windows = stream_windows(stream, 5, 100, seed=7)
    assert random.random() == before  # the global generator was not used
    random.seed(7)  # what the SparseGPT / Wanda / GISP loaders do
    expected = [random.randint(0, len(stream) - 100 - 1) for _ in range(5)]
    assert [int(w[0]) for w in windows] == expected


def test_a_corpus_too_short_for_one_window_is_a_clear_error():
    with pytest.raises(CorpusTooShortError, match=r"has 64 tokens; a window of seqlen=64 needs at least 65"):
        stream_windows(torch.arange(64), 1, 64, seed=0, corpus="tiny corpus")
    assert torch.equal(stream_windows(torch.arange(65), 2, 64, seed=0)[1], torch.arange(64))  # only offset 0 fits


class CharTokenizer:
    """One token per character (ids = code points): enough to test document windows without a model tokenizer."""

    def __call__(self, text, return_attention_mask=False, verbose=False):
        return {"input_ids": [ord(c) for c in text]}


def test_document_windows_come_from_documents_longer_than_seqlen():
    documents = ["a" * 5, "b" * 40, "c" * 3, "d" * 60]
    windows = document_windows(documents, CharTokenizer(), n_samples=12, seqlen=30, seed=0)
    assert len(windows) == 12
    letters = {chr(int(w[0])) for w in windows}
    assert letters <= {"b", "d"} and all(len(w) == 30 and len(set(w.tolist())) == 1 for w in windows)
    again = document_windows(documents, CharTokenizer(), n_samples=12, seqlen=30, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))


def test_document_windows_fail_clearly_when_no_document_is_long_enough():
    with pytest.raises(CorpusTooShortError, match="more than seqlen=30 tokens"):
        document_windows(["short", "also short"], CharTokenizer(), n_samples=2, seqlen=30, seed=0, max_draws=50)


def test_token_streams_are_cached_per_tokenizer_and_key():
    calls = []

    def text():
        calls.append(1)
        return "cached text"

    tokenizer = CharTokenizer()
    first = token_stream(tokenizer, "test-cache-key", text)
    second = token_stream(tokenizer, "test-cache-key", text)
    assert first is second and len(calls) == 1
    assert first.tolist() == [ord(c) for c in "cached text"]
    token_stream(CharTokenizer(), "test-cache-key", text)  # another tokenizer tokenises again
    assert len(calls) == 2
