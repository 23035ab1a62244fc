"""``file:PATH`` data sources (plain text and JSONL) and source-name resolution."""

from __future__ import annotations

import json

import pytest
import torch

from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import data_source, load_calibration
from gisp_plugin.data.local_files import DataFileError
from gisp_plugin.plugins.manager import UnknownNameError

TEXT = "Structured pruning removes whole attention heads and MLP channels from a language model. " * 8


def test_txt_file_gives_exact_windows_deterministic_per_seed(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    request = CalibrationRequest(f"file:{path}", n_samples=6, seqlen=24, seed=0)
    calibration = load_calibration(request, tokenizer)
    assert len(calibration) == 6 and all(len(s) == 24 for s in calibration.sequences)
    assert all(bool(m.all()) for m in calibration.loss_masks) and calibration.polarity == [0] * 6
    stream = tokenizer(TEXT)["input_ids"]
    text_of_stream = tokenizer.decode(stream)
    assert all(tokenizer.decode(s) in text_of_stream for s in calibration.sequences)
    again = load_calibration(request, tokenizer)
    other = load_calibration(CalibrationRequest(f"file:{path}", n_samples=6, seqlen=24, seed=1), tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(calibration.sequences, again.sequences, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(calibration.sequences, other.sequences, strict=True))
    assert calibration.name == f"file:{path}:6x24:seed0"
    assert "whole local file" in calibration.notes


def test_jsonl_file_joins_its_text_fields(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["first", "second"])) + "\n\n")
    source = data_source(f"file:{path}")
    assert source.kind == "text"
    assert source.text("calibration") == "first\n\nsecond" == source.text("evaluation")


def test_jsonl_line_without_text_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataFileError, match=r"bad\.jsonl:2 has no string field 'text'"):
        data_source(f"file:{path}").text("calibration")


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(DataFileError, match="no such file") as error:
        data_source(f"file:{missing}")
    assert str(missing) in str(error.value)


def test_unknown_split_names_the_choices(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    with pytest.raises(ValueError, match="unknown text split 'train'; choose 'calibration' or 'evaluation'"):
        data_source(f"file:{path}").text("train")


def test_unknown_source_lists_the_available_ones():
    with pytest.raises(UnknownNameError) as error:
        data_source("wikitext-103")
    message = str(error.value)
    assert "unknown data source 'wikitext-103'" in message
    for name in ("boolq-wiki", "c4", "cmqa", "cmqa-offline", "gsm8k", "gsm8k-offline", "lambada-novels", "ptb", "wikitext2"):
        assert name in message
    assert "file:PATH" in message
