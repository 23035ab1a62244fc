"""A text corpus with a calibration part and an evaluation part, as a data source.

Calibration draws ``n_samples`` random windows of exactly ``seqlen`` tokens from the calibration part
(``gisp_plugin.data.windows``); perplexity evaluators read the evaluation part with ``text("evaluation")``.
Every corpus says in ``parts`` how its two parts are defined, and that sentence goes into the notes
of every calibration set drawn from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gisp_plugin.data.api import CalibrationRequest, CalibrationSet, DataSource
from gisp_plugin.data.windows import document_windows, stream_windows, token_stream

SPLITS = ("calibration", "evaluation")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown text split {split!r}; choose 'calibration' or 'evaluation'")
    return split


@dataclass(frozen=True)
class TextCorpus:
    """A named corpus: ``read(split)`` gives the raw text of ``"calibration"`` or ``"evaluation"``.

    ``documents``, when set, gives the calibration documents for per-document windows (C4, as the
    reference loaders do) instead of windows from one concatenated stream. ``cache_key`` names the
    text for the per-process tokenisation cache (it changes when a local file changes).
    """

    name: str
    description: str
    parts: str
    read: Callable[[str], str]
    documents: Callable[[], Sequence[str]] | None = None
    hub_dataset: str | None = None  # the Hugging Face dataset read (None: local text)
    cache_key: Callable[[], str] | None = None

    def text(self, split: str) -> str:
        return self.read(check_split(split))

    def calibration(self, request: CalibrationRequest, tokenizer: Any) -> CalibrationSet:
        n, seqlen, seed = request.n_samples, request.seqlen, request.seed
        if self.documents is not None:
            sequences = document_windows(self.documents(), tokenizer, n, seqlen, seed, corpus=self.name)
            how = "each from a random document longer than seqlen (reference C4 sampling)"
        else:
            key = (self.cache_key() if self.cache_key else self.name) + "/calibration"
            stream = token_stream(tokenizer, key, lambda: self.text("calibration"))
            sequences = stream_windows(stream, n, seqlen, seed, corpus=f"the calibration part of {self.name}")
            how = f"at random offsets of the tokenised calibration part ({len(stream)} tokens)"
        return CalibrationSet(
            name=request.label,
            sequences=sequences,
            notes=f"{n} windows of {seqlen} tokens, seed {seed}, {how}. {self.parts}",
        )

    def as_data_source(self) -> DataSource:
        return DataSource(
            name=self.name,
            description=self.description,
            kind="text",
            calibration=self.calibration,
            text=self.text,
            hub_dataset=self.hub_dataset,
        )
