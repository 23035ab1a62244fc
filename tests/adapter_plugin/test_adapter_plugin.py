"""A family added by an adapter plugin outside the package works everywhere: every method, compaction,
LoRA recovery, onloading from disk and sharded compaction, from its declaration alone.

The plugin (``tests/adapter_plugin``, pip-installed; CI: ``pip install --no-deps ./tests/adapter_plugin``)
registers ``renamed``, a Llama whose attention is ``mixer.wq/wk/wv/wo`` and whose MLP is
``ffn.w_gate/w_in/w_out``: names no module of gisp-plugin spells, so any special case left in the package
(a projection name, a tensor-name prefix, a config key) fails here.
"""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_plugin.adapters.api import UnsupportedArchitectureError, adapter_for
from gisp_plugin.adapters.derived import derive_declaration
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.calibration.onloading import LayerPlacement, empty_model
from gisp_plugin.cli import main
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.sharded_compaction import compact_sharded
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.plugins.manager import registered
from gisp_plugin.recovery.lora import RecoveryOptions, RecoveryReport, recover
from tests.distributed.launch import torchrun
from tests.families.test_every_method_every_family import METHODS, _folded_biases
from tests.tiny import FAMILIES, SAMPLE_TEXT, SIZES, TOKENS, random_ids, random_keep

INSTALL = "pip install --no-deps ./tests/adapter_plugin"


@pytest.fixture(scope="module")
def plugin():
    try:
        metadata.version("gisp-renamed-family")
    except metadata.PackageNotFoundError:
        pytest.fail(f"the adapter plugin is not installed in this environment; run: {INSTALL}")
    import gisp_renamed_family

    return gisp_renamed_family


def renamed_model(plugin, seed: int = 0):
    """A tiny ``renamed`` model with grouped-query attention, non-trivial norms."""
    fields = {**FAMILIES["llama"], "model_type": "renamed", "num_key_value_heads": 2, **SIZES, **TOKENS, "num_hidden_layers": 3}
    torch.manual_seed(seed)
    model = plugin.RenamedForCausalLM(plugin.RenamedConfig.from_dict(fields)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def folder(plugin, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("renamed")
    renamed_model(plugin).save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT * 40)
    return root / "dense", text


def test_the_plugin_adapter_is_found_and_wins_over_the_derived_one(plugin):
    model = renamed_model(plugin)
    assert registered("adapter")["renamed"].plugin == "renamed_family"
    assert adapter_for(model) is plugin.ADAPTER and not plugin.ADAPTER.derived
    with pytest.raises(UnsupportedArchitectureError, match="model type 'renamed' .*no softmax attention module.*mixer"):
        derive_declaration(model)  # without the plugin the family would be refused


def _prune(folder, text, out, method, *extra):
    args = ["prune", "--model", str(folder), "--method", method, "--sparsity", "0.3", "--out", str(out)]
    args += ["--calibration", f"file:{text}", "--n-samples", "4", "--seqlen", "16", *METHODS[method], *extra]
    assert main(args) == 0
    return out / f"{method}-s0.30"


# SlimGPT changes the kept weights: its masked = compacted equality needs them put back, which
# tests/families/test_every_method_every_family.py does for the declared names it reads
@pytest.mark.parametrize("method", [m for m in METHODS if m != "slimgpt"])
def test_every_method_prunes_the_plugin_family_and_compaction_equals_masking(folder, tmp_path, method):
    dense_folder, text = folder
    pruned_folder = _prune(dense_folder, text, tmp_path / "out", method)
    record = json.loads((pruned_folder / "pruning.json").read_text())
    assert record["info"]["anatomy"] == {"adapter": "renamed", "anatomy": "declared", "self_check": "not needed"}
    pruned = AutoModelForCausalLM.from_pretrained(pruned_folder, trust_remote_code=True)
    native = record["info"]["saved_form"]["form"] == "native"  # one shape per layer: the family's own model
    assert type(pruned).__name__ == ("RenamedForCausalLM" if native else "GispPrunedRenamedForCausalLM")
    dense = AutoModelForCausalLM.from_pretrained(dense_folder)
    anatomy = adapter_for(dense).anatomy(dense)
    ids = random_ids(2, 10)
    with MaskedModel(dense, anatomy) as masked, torch.no_grad():
        keep = KeepMask.from_json(anatomy, record["pruned_structures"])
        masked.apply(keep, _folded_biases(dense, pruned, keep.removed_layers()))
        torch.testing.assert_close(pruned(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_recovery_adapts_the_declared_projections_and_reloads(plugin, folder, tmp_path):
    dense_folder, text = folder
    pruned_folder = _prune(dense_folder, text, tmp_path / "out", "magnitude", "--recover-steps", "3")
    record = json.loads((pruned_folder / "pruning.json").read_text())
    losses = record["info"]["recovery"]["losses"]
    assert len(losses) == 3 and all(loss == loss for loss in losses)

    # the default targets are the declaration's projections, all seven renamed ones
    model = renamed_model(plugin)
    keep = random_keep(adapter_for(model).anatomy(model), 3, 0.7)
    compact = adapter_for(model).compact(model, keep)
    report = RecoveryReport()
    data = CalibrationSet(name="random", sequences=[random_ids(1, 12, seed=s)[0] for s in range(4)])
    before = {name: p.detach().clone() for name, p in compact.named_parameters()}
    recovered = recover(compact, None, data, RecoveryOptions(steps=2, lr=1e-2, batch_size=2), report)
    leaves = {name.rsplit(".", 1)[-1] for name in report.modules}
    assert leaves == {"wq", "wk", "wv", "wo", "w_gate", "w_in", "w_out"}
    changed = {name.rsplit(".", 2)[-2] for name, p in recovered.named_parameters() if not torch.equal(p, before[name])}
    assert changed == leaves


def test_disk_onloading_of_the_plugin_family_gives_the_same_subnetwork(folder, tmp_path):
    dense_folder, text = folder
    kept_in_memory = _prune(dense_folder, text, tmp_path / "memory", "wanda_sp")
    onloaded = _prune(dense_folder, text, tmp_path / "disk", "wanda_sp", "-o", "onload=disk", "-o", "onload_device=cpu")
    memory_record = json.loads((kept_in_memory / "pruning.json").read_text())
    disk_record = json.loads((onloaded / "pruning.json").read_text())
    assert disk_record["pruned_structures"] == memory_record["pruned_structures"]

    model = empty_model(dense_folder)  # the layers stay on disk; everything else is read, by identity not name
    assert all(p.is_meta for p in model.model.layers.parameters())
    assert not any(p.is_meta for name, p in model.named_parameters() if not name.startswith("model.layers."))
    placement = LayerPlacement(model, model.model.layers, "disk", "cpu", checkpoint=dense_folder)
    with placement.walking():
        layer = placement.onload(0)
        assert not layer.mixer.wq.weight.is_meta


def test_sharded_compaction_of_the_plugin_family(plugin, folder, tmp_path):
    """``compact_sharded`` (one process) builds what ``compact`` builds, and ``--fsdp`` on two gloo ranks
    loads, scores and compacts the family sharded, writing a model equal to the masked dense one."""
    model = renamed_model(plugin)
    adapter = adapter_for(model)
    keep = random_keep(adapter.anatomy(model), 5, 0.6, empty_layer=1)
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(compact_sharded(model, keep)(ids).logits, adapter.compact(model, keep)(ids).logits)

    dense_folder, text = folder
    args = ["prune", "--model", dense_folder, "--method", "gisp", "-o", "steps=2", "--sparsity", "0.3", "--fsdp"]
    args += ["--out", tmp_path / "ranks", "--calibration", f"file:{text}", "--n-samples", "4", "--seqlen", "16"]
    args += ["--device", "cpu"]
    job = torchrun("-m", "gisp_plugin", *map(str, args))
    assert job.returncode == 0, job.stderr[-3000:]
    record = json.loads((tmp_path / "ranks" / "gisp-s0.30" / "pruning.json").read_text())
    assert record["distributed"]["fsdp"] is True
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "ranks" / "gisp-s0.30", trust_remote_code=True)
    dense = AutoModelForCausalLM.from_pretrained(dense_folder)
    anatomy = adapter_for(dense).anatomy(dense)
    with MaskedModel(dense, anatomy) as masked, torch.no_grad():
        masked.apply(KeepMask.from_json(anatomy, record["pruned_structures"]))
        torch.testing.assert_close(pruned(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-5)
