"""``gisp export FOLDER --format gguf|nemotron-nas|hf --out PATH``: a pruned model in an inference engine's format.

Prints one line: what the export keeps exact and the decoder parameters the engine executes beside the
compacted model's (padding, if any, named). ``gisp prune --export FORMAT`` and ``gisp compare --save-models
--export FORMAT`` run the same export beside every folder they save.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gisp_plugin.export.api import GROUPINGS, WEIGHT_TYPES, ExportOptions
from gisp_plugin.export.run import export_folder


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """The options every command that exports shares: tensor type, grouping, pre-tokenizer."""
    parser.add_argument("--type", dest="weight_type", default="f32", choices=WEIGHT_TYPES, help="GGUF tensor type (default f32)")
    parser.add_argument(
        "--grouping",
        default="auto",
        choices=GROUPINGS,
        help="uneven key/value groups made even by zero query heads (pad), key/value copies (replicate), or the cheaper (auto)",
    )
    parser.add_argument("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name, for a tokenizer.json it cannot tell")


def export_options(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(args.weight_type, args.grouping, args.tokenizer_pre)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export a pruned folder for an inference engine (GGUF, Nemotron-NAS, native HF)")
    parser.add_argument("folder", help="a folder written by gisp prune (or any model folder of a supported family)")
    parser.add_argument(
        "--format", required=True, help="gguf (llama.cpp, Ollama), nemotron-nas (vLLM, SGLang, TensorRT-LLM) or hf"
    )
    parser.add_argument("--out", required=True, type=Path, help="the file (gguf) or folder to write; must not exist")
    add_export_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = export_folder(args.folder, args.format, args.out, export_options(args))
    print(report.line())
    return 0
