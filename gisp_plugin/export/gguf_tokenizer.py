"""A Hugging Face tokenizer folder written into a GGUF file with gguf-py's own vocabulary readers.

gguf-py reads the three layouts: a byte-level BPE ``tokenizer.json`` (GPT-2 style, ``BpeVocab``), a
SentencePiece ``tokenizer.model`` (``SentencePieceVocab``) and a byte-fallback BPE ``tokenizer.json``
(Llama 2 / Mistral style, ``LlamaHfVocab``). What it cannot tell is llama.cpp's *pre-tokenizer* name for a
byte-level BPE, the rule that splits text before the merges; ``PRE_TOKENIZERS`` declares it for the
``pre_tokenizer`` layouts of ``tokenizer.json`` that llama.cpp implements, each keyed by the layout's
fields. A layout not listed is refused with one line, since a wrong split would give other tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

# tokenizer.json pre_tokenizer layouts -> llama.cpp's pre-tokenizer name. Each layout is the list of
# pre-tokenizer steps, a step given by the fields that decide its split (a Split step by its regex).
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


class TokenizerExportError(ValueError):
    """A tokenizer that cannot be written into a GGUF file exactly."""


def _step(step: dict) -> tuple:
    """The fields of one pre-tokenizer step that decide how it splits text."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return (kind, bool(step.get("use_regex", True)))
    if kind == "Digits":
        return (kind, bool(step.get("individual_digits", False)))
    if kind == "Split":
        return (kind, step.get("pattern", {}).get("Regex", step.get("pattern", {}).get("String")))
    return (kind,)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json``."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    layout = tuple(_step(step) for step in steps)
    if layout not in PRE_TOKENIZERS:
        names = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        raise TokenizerExportError(
            f"llama.cpp has no pre-tokenizer known here for this tokenizer.json (steps {[s[0] for s in layout]}); "
            f"known: {names}. Pass --tokenizer-pre NAME with the name llama.cpp uses for it"
        )
    return PRE_TOKENIZERS[layout]


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, n_vocab: int, pre: str | None = None) -> str:
    """Write the tokenizer of ``folder`` padded to ``n_vocab`` tokens (the embedding's rows); its kind is returned.

    Token ids are the Hugging Face ones: rows past the tokenizer's last id get unused ``[PADn]`` tokens.
    """
    tokenizer_json = folder / "tokenizer.json"
    try:
        vocab = BpeVocab(folder)
        model = "gpt2"
        pre = pre or pre_tokenizer_name(json.loads(tokenizer_json.read_text()))
    except FileNotFoundError:
        vocab, model = None, "llama"
    if vocab is None:
        try:
            vocab = SentencePieceVocab(folder) if (folder / "tokenizer.model").exists() else LlamaHfVocab(folder)
        except (FileNotFoundError, OSError, ImportError) as err:
            raise TokenizerExportError(
                f"no tokenizer llama.cpp can read in {str(folder)!r} (a byte-level BPE tokenizer.json, a SentencePiece "
                f"tokenizer.model, or a byte-fallback BPE tokenizer.json): {err}"
            ) from None
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > n_vocab:
        raise TokenizerExportError(f"the tokenizer has {len(tokens)} tokens but the model embeds only {n_vocab}")
    for index in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    return model if pre is None else f"{model} ({pre})"
