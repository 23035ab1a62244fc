"""The model card (``README.md``) of a pruned folder, written with ``huggingface_hub.ModelCard``.

A hub page, or a colleague opening the folder, sees where the model comes from (``base_model`` in the YAML
metadata), how it was pruned (method, options, target and achieved sparsity, parameters before and after,
calibration data), whether it was quantised, how it scored when the folder came from ``gisp compare`` or
``gisp eval --write-card``, and how to load it. Everything is read from the folder's ``pruning.json``
record, so the card never disagrees with the model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
# Built-in model names and the hub repositories they are copies of.
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_base_model(name: str) -> str | None:
    """The hub id of the base model, or ``None`` when it was a local folder (no honest hub id to name)."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not Path(name).exists():
        return name
    return None


def card_data(record: dict[str, Any]) -> ModelCardData:
    """The YAML metadata: base model, library, tags (pruning, the method, the quantisation) and task."""
    tags = ["pruning", "structured-pruning", record["method"], "gisp-plugin"]
    quantization = record.get("info", {}).get("quantization")
    if quantization:
        tags += ["torchao", quantization["name"]]
    return ModelCardData(
        base_model=hub_base_model(record["base_model"]),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )


def _settings_table(record: dict[str, Any]) -> list[str]:
    params = record["params"]
    info = record.get("info", {})
    rows = [
        ("base model", f"`{record['base_model']}`"),
        ("method", f"`{record['method']}`"),
        ("options", f"`{json.dumps(record['options'], sort_keys=True)}`" if record["options"] else "defaults"),
        ("target sparsity", f"{record['target']:.2%}"),
        ("achieved sparsity", f"{record['sparsity']:.2%} of the decoder parameters"),
        ("decoder parameters", f"{params.get('decoder_dense', params['decoder']):,} -> {params['decoder']:,}"),
        ("all parameters", f"{params.get('total_dense', params['total']):,} -> {params['total']:,}"),
        ("calibration data", record.get("calibration") or "none (the method uses no data)"),
        ("seed", str(record.get("seed", 0))),
    ]
    if info.get("pad_to", 1) > 1:
        rows.append(("MLP widths", f"padded to multiples of {info['pad_to']} with inert zero channels"))
    if "recovery" in info:
        rows.append(("recovery", f"LoRA, {info['recovery']['steps']} steps on {info['recovery']['data']}"))
    quantization = info.get("quantization")
    if quantization:
        rows.append(("quantisation", f"torchao `{quantization['config']}` (`{quantization['name']}`), decoder linear layers"))
    rows.append(("made with", f"gisp-plugin {record.get('gisp_plugin_version', '?')}, {record.get('created', '')}"))
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]


def _evaluation_table(evaluations: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| evaluation | metric | value |", "|---|---|---|"]
    for spec, metrics in evaluations.items():
        lines += [f"| `{spec}` | {name} | {value:.4f} |" for name, value in metrics.items() if "stderr" not in name]
    return lines


def _how_to_load(record: dict[str, Any], repo_id: str | None) -> list[str]:
    where = repo_id or "path/to/this/folder"
    native = record.get("info", {}).get("saved_form", {}).get("form") == "native"
    intro = (
        "Every layer has the same shape, so this is the family's own model: it loads without remote code, and "
        "every engine that runs the base model runs it (vLLM, SGLang, llama.cpp's convert_hf_to_gguf.py):"
        if native
        else "The pruned layers have their own shapes, so the modelling code ships in this folder "
        "(`modeling_gisp_pruned.py`, needs only torch and transformers); `gisp export` writes it for inference engines:"
    )
    lines = [
        intro,
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{where}", trust_remote_code={not native})',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
        f'or, with gisp-plugin installed (checks the record and needs no remote code): `gisp_plugin.load_pruned("{where}")`.',
    ]
    if record.get("info", {}).get("quantization"):
        lines += ["", "The weights are torchao tensors (`quantization_config` in `config.json`): install `torchao` to load them."]
    return lines


def model_card(
    record: dict[str, Any], evaluations: dict[str, dict[str, float]] | None = None, repo_id: str | None = None
) -> ModelCard:
    """The card of a pruned model from its record, with ``evaluations`` (spec -> metrics) when there are any."""
    base = record["base_model"]
    title = f"{Path(base).name if hub_base_model(base) is None else base} pruned with {record['method']}"
    body = [
        f"# {title} to {record['sparsity']:.0%} structural sparsity",
        "",
        f"Structurally pruned with gisp-plugin: whole attention heads and MLP channels were removed from `{base}`, "
        "so the model is physically smaller (fewer and narrower matrices), not masked.",
        "",
        "## Pruning",
        "",
        *_settings_table(record),
        "",
    ]
    if evaluations:
        body += ["## Evaluation", "", *_evaluation_table(evaluations), ""]
    body += ["## How to load", "", *_how_to_load(record, repo_id), ""]
    content = f"---\n{card_data(record).to_yaml()}\n---\n\n" + "\n".join(body)
    return ModelCard(content)


def write_model_card(folder: str | Path, record: dict[str, Any], evaluations: dict[str, dict[str, float]] | None = None) -> Path:
    """Write ``README.md`` into ``folder`` (replacing an earlier card) and return its path."""
    path = Path(folder) / CARD_FILE
    model_card(record, evaluations).save(path)
    log.debug("wrote the model card %s", path)
    return path
