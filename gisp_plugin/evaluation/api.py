"""What an evaluator plugin provides.

An evaluator measures one model (dense, masked or compacted) and returns named metrics. Its options
are a dataclass, filled from user strings the same way method options are
(``--eval perplexity:source=boolq-wiki,seqlen=128``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalResult:
    """Metrics (flat name -> number) plus details for reports (per-task tables, settings used)."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluator:
    """A named evaluator: ``evaluate(model, tokenizer, options) -> EvalResult``.

    ``check(options)``, when given, raises on what can be known wrong without a model (unknown task
    names, missing data), so a comparison fails before it loads anything.
    """

    name: str
    description: str
    evaluate: Callable[[Any, Any, Any], EvalResult]
    options: type
    check: Callable[[Any], None] | None = None
