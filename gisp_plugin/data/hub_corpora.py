"""The pruning papers' text corpora, loaded by ``datasets`` name for real users: C4, WikiText-2, PTB.

They are the ones SparseGPT, Wanda, FLAP and GISP calibrate and evaluate on, split the same way:

- ``c4``: ``allenai/c4`` shard ``en/c4-train.00000-of-01024.json.gz`` for calibration (windows from
  random documents, as the reference ``get_c4``), ``en/c4-validation.00000-of-00008.json.gz`` for
  evaluation (its first 1100 documents joined by spaces, the reference ``valenc``). ``text("calibration")``
  is the first 1100 training documents the same way (the whole shard is ~800 MB of text).
- ``wikitext2``: ``Salesforce/wikitext`` ``wikitext-2-raw-v1``, train joined by spaces / test joined by
  blank lines (the reference ``get_wikitext2``).
- ``ptb``: Penn Treebank ``ptb_text_only`` ``penn_treebank``, train / test, sentences joined by spaces.
  Its hub repo is a loading script, which ``datasets>=4`` refuses, so the Hub's Parquet export of it is read.

Offline none of them loads; the error names the dataset and the offline alternatives.
"""

from __future__ import annotations

from gisp_plugin.data.hub import load_hub_dataset
from gisp_plugin.data.text_corpus import TextCorpus

OFFLINE_TEXT_ALTERNATIVES = (
    "lambada-novels (LAMBADA novel passages)",
    "boolq-wiki (BoolQ Wikipedia passages)",
    "file:PATH (a local .txt or .jsonl file)",
)

C4_PATH = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_TEXT_DOCUMENTS = 1100
WIKITEXT_PATH, WIKITEXT_CONFIG = "Salesforce/wikitext", "wikitext-2-raw-v1"
PTB_PARQUET = "hf://datasets/ptb-text-only/ptb_text_only@refs%2Fconvert%2Fparquet/penn_treebank/{split}/*.parquet"


def _c4_split(split: str):
    hub_split, file = ("train", C4_TRAIN_FILE) if split == "calibration" else ("validation", C4_VALIDATION_FILE)
    return load_hub_dataset("c4", C4_PATH, split=hub_split, data_files={hub_split: file}, alternatives=OFFLINE_TEXT_ALTERNATIVES)


def _c4_text(split: str) -> str:
    return " ".join(_c4_split(split)[:C4_TEXT_DOCUMENTS]["text"])


def _c4_documents() -> list[str]:
    return _c4_split("calibration")["text"]


def _wikitext2_text(split: str) -> str:
    hub_split, joiner = ("train", " ") if split == "calibration" else ("test", "\n\n")
    rows = load_hub_dataset("wikitext2", WIKITEXT_PATH, WIKITEXT_CONFIG, split=hub_split, alternatives=OFFLINE_TEXT_ALTERNATIVES)
    return joiner.join(rows["text"])


def _ptb_text(split: str) -> str:
    hub_split = "train" if split == "calibration" else "test"
    rows = load_hub_dataset(
        "ptb",
        "parquet",
        split=hub_split,
        data_files={hub_split: PTB_PARQUET.format(split=hub_split)},
        alternatives=OFFLINE_TEXT_ALTERNATIVES,
        shown_as=f"ptb-text-only/ptb_text_only/penn_treebank (its Parquet export, split {hub_split!r})",
    )
    return " ".join(rows["sentence"])


C4 = TextCorpus(
    name="c4",
    description="C4 (allenai/c4 en): windows of random train-shard-0 documents; evaluation on validation shard 0 (needs the Hub)",
    parts="Calibration part: C4 train shard 00000; evaluation part: C4 validation shard 00000 (disjoint splits).",
    read=_c4_text,
    documents=_c4_documents,
    hub_dataset="allenai/c4",
)
WIKITEXT2 = TextCorpus(
    name="wikitext2",
    description="WikiText-2 raw (Salesforce/wikitext): windows of the train split; evaluation on test (needs the Hub)",
    parts="Calibration part: WikiText-2 train; evaluation part: WikiText-2 test (disjoint splits).",
    read=_wikitext2_text,
    hub_dataset="Salesforce/wikitext",
)
PTB = TextCorpus(
    name="ptb",
    description="Penn Treebank (ptb_text_only, Parquet export): windows of the train split; evaluation on test (needs the Hub)",
    parts="Calibration part: PTB train; evaluation part: PTB test (disjoint splits).",
    read=_ptb_text,
    hub_dataset="ptb-text-only/ptb_text_only",
)
HUB_CORPORA = (C4, WIKITEXT2, PTB)
