"""Saved pruned models reload exactly, with this package and with plain transformers."""

import errno
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import gisp_plugin
from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.checkpoint.saving import CheckpointError, load_pruned, read_record, save_pruned
from gisp_plugin.checkpoint.trajectory import NotNestedError, Trajectory
from gisp_plugin.masking.masked_model import MaskedModel
from tests.tiny import FAMILIES, random_ids, random_keep, record_for, tiny_model, with_attention


def _pruned(family: str, seed: int = 0):
    model = tiny_model(family)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, seed, 0.6)
    hidden = model.config.hidden_size
    biases = {"model.layers.1.self_attn.o_proj": torch.randn(hidden, generator=torch.Generator().manual_seed(seed))}
    compact = adapter.compact(model, keep, biases)
    record = record_for(compact, anatomy, keep, target=0.4)
    return model, compact, keep, biases, record


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reload_equals_saved(tmp_path, tokenizer, family):
    _, compact, _, _, record = _pruned(family)
    folder = save_pruned(compact, tokenizer, tmp_path / "m", record)
    assert {"model.safetensors", "config.json", "pruning.json", "modeling_gisp_pruned.py", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")), "no pickle files"
    ids = random_ids()
    reloaded = gisp_plugin.load_pruned(folder)
    plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        expected = compact(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-6)
    saved = compact.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in reloaded.state_dict().items())
    assert read_record(folder)["pruned_structures"] == record.pruned_structures


@pytest.mark.parametrize(("family", "attn"), with_attention(FAMILIES))
def test_reloaded_in_bfloat16_generates_like_the_saved_model(tmp_path, tokenizer, family, attn):
    """fp32 save, bf16 reload with either attention: plain transformers and load_pruned agree token for token."""
    _, compact, _, _, record = _pruned(family)
    folder = save_pruned(compact, tokenizer, tmp_path / "m", record)
    ids = random_ids(1, 6, 2)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    ours = gisp_plugin.load_pruned(folder, dtype=torch.bfloat16, attn_implementation=attn)
    plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16, attn_implementation=attn)
    assert ours.dtype == plain.dtype == torch.bfloat16
    assert ours.config._attn_implementation == attn
    assert torch.equal(ours.generate(ids, **kwargs), plain.generate(ids, **kwargs))


def test_errors_for_missing_foreign_and_corrupt_folders(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="no pruned model folder"):
        load_pruned(tmp_path / "nope")
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="not a gisp-plugin pruned model"):
        load_pruned(tmp_path / "dense")
    _, compact, _, _, record = _pruned("llama")
    folder = save_pruned(compact, tokenizer, tmp_path / "m", record)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "pruning.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pruned(broken)
    shutil.copy(folder / "pruning.json", broken / "pruning.json")
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors' is damaged or truncated"):
        load_pruned(broken)
    record_data = json.loads((folder / "pruning.json").read_text())
    record_data["params"]["decoder"] += 1
    (folder / "pruning.json").write_text(json.dumps(record_data))
    with pytest.raises(CheckpointError, match="decoder parameters"):
        load_pruned(folder)


class DiskFillsUp:
    """A tokenizer whose files fill the disk: it writes them, then fails as a full disk does (after the
    weights, before the record and the model card)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def save_pretrained(self, folder) -> None:
        self.tokenizer.save_pretrained(folder)
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))


def test_save_replaces_atomically_and_leaves_no_partial(tmp_path, tokenizer):
    _, compact, _, _, record = _pruned("qwen2")
    save_pruned(compact, tokenizer, tmp_path / "m", record)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(OSError, match="No space left on device"):
        save_pruned(compact, DiskFillsUp(tokenizer), tmp_path / "m", replace(record, method="other"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no partial folder beside it
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before  # the old one whole
    save_pruned(compact, tokenizer, tmp_path / "m", replace(record, method="other"))  # a save that completes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert json.loads((tmp_path / "m" / "pruning.json").read_text())["method"] == "other"


def _fail_swap(monkeypatch) -> list[tuple[str, str]]:
    """``os.replace`` that fails to move the complete new folder into place, as a rename does on a read-only
    directory; every other rename works. Returns the renames asked for."""
    real, calls = os.replace, []

    def replace_(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.endswith(".partial"):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace_)
    return calls


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, tokenizer, monkeypatch):
    _, compact, _, _, record = _pruned("qwen2")
    save_pruned(compact, tokenizer, tmp_path / "m", record)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    calls = _fail_swap(monkeypatch)
    with pytest.raises(OSError, match="Read-only file system"):
        save_pruned(compact, tokenizer, tmp_path / "m", replace(record, method="other"))
    assert (".m.partial", "m") in calls  # the swap itself failed, after the new folder was complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing partial, nothing aside
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before  # the old one whole


def test_a_crash_mid_swap_loses_nothing(tmp_path, tokenizer):
    """A process killed between the two renames leaves the old folder aside; the next save puts it back first,
    so a save that then fails still leaves the old model in its place."""
    _, compact, _, _, record = _pruned("qwen2")
    save_pruned(compact, tokenizer, tmp_path / "m", record)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    (tmp_path / "m").rename(tmp_path / ".m.old")  # the state a SIGKILL between the renames leaves
    with pytest.raises(OSError, match="No space left on device"):
        save_pruned(compact, DiskFillsUp(tokenizer), tmp_path / "m", replace(record, method="other"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


def test_trajectory_rebuilds_every_step_from_the_dense_model(tmp_path):
    model = tiny_model("mistral")
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    trajectory = Trajectory()
    keep = KeepMask.dense(anatomy)
    generator = torch.Generator().manual_seed(0)
    steps = []
    for step in range(4):
        for key in keep.flags:
            keep[key] = keep[key] & (torch.rand(keep[key].shape, generator=generator) < 0.8)
        trajectory.record(keep, anatomy.sparsity(keep), loss=float(step))
        steps.append(keep.copy())
    trajectory.save(tmp_path / "trajectory.json")
    loaded = Trajectory.load(tmp_path / "trajectory.json", anatomy)
    ids = random_ids()
    for step, expected_keep in enumerate(steps):
        rebuilt = loaded.keep_at(step)
        assert rebuilt == expected_keep
        with MaskedModel(model, anatomy) as masked, torch.no_grad():
            masked.apply(expected_keep)
            torch.testing.assert_close(adapter.compact(model, rebuilt, {})(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert loaded.step_closest_to(anatomy.sparsity(steps[2])) == 2
    with pytest.raises(NotNestedError):
        loaded.record(KeepMask.dense(anatomy), 0.0)
