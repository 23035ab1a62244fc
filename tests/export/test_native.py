"""The family's own model for a compacted one: saved by `gisp prune` when every layer has one shape, and
written padded by `gisp export --format hf`; both load with trust_remote_code=False and compute what the
compacted model computes (float32; zero padding only reorders sums: 1e-5 of O(1) logits)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.checkpoint.saving import load_pruned, save_pruned
from gisp_plugin.export.api import ExportError
from gisp_plugin.export.native import NativeFormError, check_same_outputs, saved_form
from gisp_plugin.export.run import export_folder
from tests.tiny import DERIVED_FAMILIES, FAMILIES, MOE_FAMILIES, random_ids, random_keep, record_for, tiny_folder, tiny_model

DENSE_FAMILIES = sorted(set(FAMILIES) - MOE_FAMILIES - set(DERIVED_FAMILIES))  # the declared dense families
ATOL = 1e-5


def uniform_keep(anatomy) -> KeepMask:
    """The same heads (one per key/value group) and the same channels pruned in every layer; layer 1 removed."""
    keep = KeepMask.dense(anatomy, layers=True)
    for (layer, name), flags in list(keep.flags.items()):
        if name == "layer":
            continue
        flags = flags.clone()
        kind = anatomy.kind(layer, name)
        readers = kind.dependents[0].readers if kind.dependents else [[unit] for unit in range(kind.count)][:2]
        for group in readers:
            flags[group[0]] = False
        if name != "attn_head":
            flags[: kind.count // 2] = False
        keep[layer, name] = flags
    keep[1, "layer"] = torch.zeros(1, dtype=torch.bool)
    return keep


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_uniform_compaction_saves_as_the_family_and_loads_without_remote_code(tmp_path, tokenizer, family):
    model = tiny_model(family, layers=4)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = uniform_keep(anatomy)
    compact = adapter.compact(model, keep)
    native, form = saved_form(compact)
    assert form["form"] == "native", form
    record = record_for(compact, anatomy, keep)
    record.info["saved_form"] = form
    folder = save_pruned(native, tokenizer, tmp_path / "native", record)
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and not (folder / "modeling_gisp_pruned.py").exists()
    assert config["num_hidden_layers"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    assert type(loaded).__module__.startswith("transformers.models.")
    ids = random_ids(2, 10)
    torch.testing.assert_close(_logits(loaded, ids), _logits(compact, ids), rtol=0, atol=ATOL)
    torch.testing.assert_close(_logits(load_pruned(folder), ids), _logits(compact, ids), rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_layers_of_different_shapes_keep_the_pruned_form_and_say_why(family):
    model = tiny_model(family, layers=3)
    adapter = adapter_for(model)
    compact = adapter.compact(model, random_keep(adapter.anatomy(model), seed=3, p_keep=0.6))
    same, form = saved_form(compact)
    assert same is compact and form["form"] == "gisp-pruned"
    assert "trust_remote_code=True" in form["why"] and ("differ" in form["why"] or "uneven" in form["why"])


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_hf_export_pads_any_mask_to_the_family_exactly(tmp_path, tokenizer, family):
    model = tiny_model(family, layers=4)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, seed=4, p_keep=0.6, empty_layer=2)
    compact = adapter.compact(model, keep)
    folder = save_pruned(compact, tokenizer, tmp_path / "pruned", record_for(compact, anatomy, keep))
    report = export_folder(folder, "hf", tmp_path / "hf")
    assert report.executed_params >= report.compacted_params and report.padding
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=False).eval()
    ids = random_ids(1, 12)
    torch.testing.assert_close(_logits(loaded, ids), _logits(compact, ids), rtol=0, atol=ATOL)


def test_mixture_of_experts_is_refused_by_the_hf_export(tmp_path, tokenizer):
    model = tiny_model("mixtral", layers=2)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, seed=1, p_keep=0.7)
    compact = adapter.compact(model, keep)
    folder = save_pruned(compact, tokenizer, tmp_path / "pruned", record_for(compact, anatomy, keep))
    with pytest.raises(ExportError, match="experts of their own widths"):
        export_folder(folder, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_equality_check_refuses_a_model_that_computes_otherwise():
    with pytest.raises(NativeFormError, match="logits differ"):
        check_same_outputs(tiny_model("llama", seed=0), tiny_model("llama", seed=1), "llama")


def test_gisp_prune_saves_layer_removal_natively(tmp_path, tokenizer):
    model_dir, text = tiny_folder(tmp_path, "llama", tokenizer)
    command = [sys.executable, "-m", "gisp_plugin", "prune", "--model", str(model_dir), "--method", "shortgpt"]
    command += ["--sparsity", "0.3", "--calibration", f"file:{text}", "--n-samples", "4", "--seqlen", "32"]
    command += ["--out", str(tmp_path / "run"), "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "run" / "shortgpt-s0.30"
    record = json.loads((folder / "pruning.json").read_text())
    assert record["info"]["saved_form"]["form"] == "native"
    assert not (folder / "modeling_gisp_pruned.py").exists()
    removed = [layer for layer, kinds in record["pruned_structures"].items() if kinds.get("layer")]
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    assert removed and loaded.config.num_hidden_layers == 3 - len(removed)


def test_a_head_count_the_family_config_refuses_falls_back_and_pads_exactly(tmp_path, tokenizer):
    """Llama's config refuses a hidden size that is not a multiple of the query heads (48 over 5), even with
    ``head_dim`` given: the native save falls back and says why, and ``--format hf`` pads to 6 heads, exactly."""
    model = tiny_model("llama", layers=2)  # hidden 48, 6 heads of 8
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = KeepMask.dense(anatomy)
    for layer in range(2):
        flags = keep[layer, "attn_head"].clone()
        flags[0] = False
        keep[layer, "attn_head"] = flags  # every layer keeps 5 heads: one shape, which the config refuses
    compact = adapter.compact(model, keep)
    same, form = saved_form(compact)
    assert same is compact and form["form"] == "gisp-pruned"
    assert "refuses 5/5 heads" in form["why"] and "not a multiple" in form["why"], form["why"]
    folder = save_pruned(compact, tokenizer, tmp_path / "pruned", record_for(compact, anatomy, keep))
    export_folder(folder, "hf", tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=False).eval()
    assert loaded.config.num_attention_heads == 6
    ids = random_ids(1, 12)
    torch.testing.assert_close(_logits(loaded, ids), _logits(compact, ids), rtol=0, atol=ATOL)


# Derived families whose own config cannot hold a compacted head count: the head size follows hidden / heads
NATIVE_REFUSED = {"stablelm": "config builds", "helium": "config builds"}


@pytest.mark.parametrize("family", DERIVED_FAMILIES)
def test_a_derived_family_saves_natively_when_its_config_holds_the_shape(tmp_path, tokenizer, family):
    """The derived anatomy is read again off the compacted model (as its dense family); plain MLPs, LayerNorms,
    xIELU's buffers and OLMo 2's norms over whole projections (made exact by scaling) go into the family's own
    model, which must equal the compacted one on logits, through the cache and in greedy generation."""
    model = tiny_model(family, layers=4)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = uniform_keep(anatomy)
    compact = adapter.compact(model, keep)
    native, form = saved_form(compact)
    if family in NATIVE_REFUSED:
        assert native is compact and form["form"] == "gisp-pruned" and NATIVE_REFUSED[family] in form["why"], form
        return
    assert form["form"] == "native", form
    folder = save_pruned(native, tokenizer, tmp_path / "native", record_for(compact, anatomy, keep))
    assert not (folder / "modeling_gisp_pruned.py").exists()
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    assert type(loaded).__module__.startswith("transformers.models.")
    ids = random_ids(2, 10)
    torch.testing.assert_close(_logits(loaded, ids), _logits(compact, ids), rtol=0, atol=ATOL)
    with torch.no_grad():
        prefix = loaded(ids[:, :-1], use_cache=True)
        step = loaded(ids[:, -1:], cache=prefix.cache).logits[:, -1]
        torch.testing.assert_close(step, _logits(compact, ids)[:, -1], rtol=0, atol=ATOL)
        want = compact.generate(ids[:1], max_new_tokens=5, do_sample=False)
        assert torch.equal(loaded.generate(ids[:1], max_new_tokens=5, do_sample=False), want)
