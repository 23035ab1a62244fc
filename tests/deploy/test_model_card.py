"""Model cards of pruned folders: YAML metadata that huggingface_hub parses, and the facts of the record."""

import json

from huggingface_hub import ModelCard

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.saving import read_record, save_pruned
from gisp_plugin.cli import main
from gisp_plugin.deploy.model_card import hub_base_model, model_card
from tests.tiny import SAMPLE_TEXT, random_keep, record_for, tiny_model


def _saved(tmp_path, tokenizer, base_model: str, **kwargs):
    model = tiny_model("qwen2")
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, 0, 0.6)
    compact = adapter.compact(model, keep, {})
    record = record_for(compact, anatomy, keep)
    record.base_model = base_model
    record.method = "gisp"
    record.calibration = "lambada-novels:32x128"
    return save_pruned(compact, tokenizer, tmp_path / "m", record, **kwargs)


def test_every_pruned_folder_has_a_card_that_names_its_base_model(tmp_path, tokenizer):
    folder = _saved(tmp_path, tokenizer, "smollm2-135m")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags[:3] == ["pruning", "structured-pruning", "gisp"]
    record = read_record(folder)
    text = card.text
    assert f"{record['sparsity']:.2%} of the decoder parameters" in text and "30.00%" in text
    assert f"{record['params']['decoder']:,}" in text and "lambada-novels:32x128" in text
    assert 'from_pretrained("path/to/this/folder", trust_remote_code=True)' in text and "load_pruned" in text
    assert "## Evaluation" not in text


def test_card_with_evaluations_and_a_hub_id(tmp_path, tokenizer):
    folder = _saved(tmp_path, tokenizer, "Qwen/Qwen2.5-0.5B", evaluations={"perplexity:source=x": {"ppl[x@128]": 12.5}})
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B"
    assert "| `perplexity:source=x` | ppl[x@128] | 12.5000 |" in card.text


def test_a_local_base_model_is_not_claimed_as_a_hub_id(tmp_path):
    assert hub_base_model(str(tmp_path)) is None and hub_base_model("./owner/name") is None
    record = {"base_model": str(tmp_path), "method": "flap", "options": {}, "target": 0.2, "sparsity": 0.21}
    record["params"] = {"decoder": 8, "total": 10}
    card = model_card(record, repo_id="me/pruned")
    assert card.data.base_model is None and f"`{tmp_path}`" in card.text
    assert 'from_pretrained("me/pruned", trust_remote_code=True)' in card.text


def test_gisp_eval_write_card_puts_the_results_in_the_card(tmp_path, tokenizer, capsys):
    folder = _saved(tmp_path, tokenizer, "smollm2-135m")
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 40)
    spec = f"perplexity:source=file:{text},seqlen=16,max_windows=4"
    assert main(["eval", "--model", str(folder), "--eval", spec, "--write-card", "--json", str(tmp_path / "r.json")]) == 0
    ppl = json.loads((tmp_path / "r.json").read_text())["results"][spec]["metrics"][f"ppl[file:{text}@16]"]
    card = ModelCard.load(folder / "README.md")
    assert f"| `{spec}` | ppl[file:{text}@16] | {ppl:.4f} |" in card.text
    assert "bytes/parameter" in capsys.readouterr().out
    assert main(["eval", "--model", str(folder), "--eval", spec, "--write-card", "--quantize", "int8wo"]) == 2
