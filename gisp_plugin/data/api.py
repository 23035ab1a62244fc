"""Calibration data as methods see it, and what a data-source plugin provides.

Every kind of calibration data (text windows, multiple-choice options, question/answer pairs) becomes
the same thing: tokenised sequences, a mask of the tokens the loss looks at, and for multiple choice a
polarity per sequence (+1 correct option, -1 wrong option). Losses and statistics engines never need
to know where the data came from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CalibrationRequest:
    """How much calibration data to draw: ``n_samples`` sequences of at most ``seqlen`` tokens."""

    source: str
    n_samples: int
    seqlen: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.seqlen < 2:
            raise ValueError(f"calibration needs n_samples >= 1 and seqlen >= 2, got {self.n_samples} x {self.seqlen}")

    @property
    def label(self) -> str:
        return f"{self.source}:{self.n_samples}x{self.seqlen}:seed{self.seed}"


@dataclass
class CalibrationBatch:
    """A right-padded batch: ``labels`` is -100 wherever no loss is taken (padding, prompts)."""

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    labels: torch.Tensor  # [batch, seq]
    polarity: torch.Tensor  # [batch], +1 / -1 for multiple-choice options, 0 otherwise

    def to(self, device: torch.device | str) -> CalibrationBatch:
        return CalibrationBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.polarity)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class CalibrationSet:
    """Tokenised calibration sequences with the tokens the loss looks at.

    ``loss_masks[i]`` flags the tokens of sequence ``i`` that are prediction targets (all tokens for
    text; the answer or option tokens for task data). ``polarity[i]`` is +1 / -1 for the correct /
    wrong options of multiple-choice data and 0 for everything else.
    """

    name: str
    sequences: list[torch.Tensor]
    loss_masks: list[torch.Tensor] = field(default_factory=list)
    polarity: list[int] = field(default_factory=list)
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.sequences:
            raise ValueError(f"calibration set {self.name!r} is empty")
        if not self.loss_masks:
            self.loss_masks = [torch.ones(len(s), dtype=torch.bool) for s in self.sequences]
        if not self.polarity:
            self.polarity = [0] * len(self.sequences)
        if not (len(self.sequences) == len(self.loss_masks) == len(self.polarity)):
            raise ValueError("sequences, loss_masks and polarity must have one entry per sequence")

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def batches(self, batch_size: int, pad_token_id: int = 0) -> Iterator[CalibrationBatch]:
        """Consecutive right-padded batches in a fixed order (results never depend on iteration luck)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            seqs = self.sequences[start : start + batch_size]
            masks = self.loss_masks[start : start + batch_size]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(seqs), width), dtype=torch.long)
            labels = torch.full((len(seqs), width), -100, dtype=torch.long)
            for row, (seq, mask) in enumerate(zip(seqs, masks, strict=True)):
                input_ids[row, : len(seq)] = seq
                attention[row, : len(seq)] = 1
                labels[row, : len(seq)] = torch.where(mask, seq, torch.full_like(seq, -100))
            polarity = torch.tensor(self.polarity[start : start + batch_size], dtype=torch.long)
            yield CalibrationBatch(input_ids, attention, labels, polarity)


@dataclass(frozen=True)
class DataSource:
    """A named source of calibration (and, for text, evaluation) data.

    ``kind`` is ``"text"``, ``"multiple_choice"`` or ``"qa"``. ``calibration`` draws a calibration set
    with a tokenizer; ``text`` (text sources only) returns the raw text of a split (``"calibration"``
    or ``"evaluation"``) for perplexity. ``hub_dataset`` names the Hugging Face dataset it reads (``None``:
    local data), so an offline machine refuses it before any model is loaded.
    """

    name: str
    description: str
    kind: str
    calibration: Callable[[CalibrationRequest, object], CalibrationSet]
    text: Callable[[str], str] | None = None
    hub_dataset: str | None = None
