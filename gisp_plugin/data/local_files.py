"""Local text files as data sources: ``file:/path/x.txt`` (plain UTF-8) or ``file:/path/x.jsonl``.

A ``.jsonl`` file holds one JSON object per line with a ``"text"`` field; the texts are joined by
blank lines. A file is one corpus used whole for whichever role it gets: both ``text("calibration")``
and ``text("evaluation")`` return all of it, so pair different files for calibration and evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

from gisp_plugin.data.api import DataSource
from gisp_plugin.data.text_corpus import TextCorpus

FILE_PREFIX = "file:"
JSONL_SUFFIXES = (".jsonl",)
JSONL_FIELD = "text"


class DataFileError(FileNotFoundError):
    """A ``file:`` data source whose file is missing or unreadable."""


def read_text_file(path: Path) -> str:
    """The text of a plain file, or of a JSONL file's ``"text"`` fields joined by blank lines."""
    if path.suffix.lower() not in JSONL_SUFFIXES:
        return path.read_text(encoding="utf-8")
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFileError(f"{path}:{number} is not valid JSON ({error})") from error
            if not isinstance(record, dict) or not isinstance(record.get(JSONL_FIELD), str):
                raise DataFileError(f"{path}:{number} has no string field {JSONL_FIELD!r}; a JSONL data file needs one per line")
            texts.append(record[JSONL_FIELD])
    return "\n\n".join(texts)


def file_source(name: str) -> DataSource:
    """The data source for ``file:PATH`` (``name`` with or without the prefix); the file must exist."""
    raw = name[len(FILE_PREFIX) :] if name.startswith(FILE_PREFIX) else name
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise DataFileError(f"data source {FILE_PREFIX}{raw!r}: no such file {str(path)!r} (expected a .txt or .jsonl file)")
    corpus = TextCorpus(
        name=f"{FILE_PREFIX}{path}",
        description=f"local file {path} (whole file for calibration and for evaluation)",
        parts=f"The whole local file {path} (a file is one corpus; it is not split into parts).",
        read=lambda split: read_text_file(path),
        cache_key=lambda: f"{FILE_PREFIX}{path}@{path.stat().st_mtime_ns}",
    )
    return corpus.as_data_source()
