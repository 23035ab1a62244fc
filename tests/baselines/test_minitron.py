"""Minitron: scores against an independent computation, uniform choices, and `gisp prune` end to end.

The independent computation runs one unpadded sequence at a time through the plain model, with hooks on
modules named here per family (``o_proj``, ``down_proj``, the two pre-norms), takes ``torch.mean`` of
``|a|`` over the sequence and ``torch.linalg.vector_norm`` over the sequences; layer scores come from
ShortGPT's hand computation (``1 - cos`` per token from ``output_hidden_states``).
"""

import json

import pytest
import torch
from gisp_baselines.minitron import (
    ActivationNorms,
    Importance,
    MinitronOptions,
    candidate_fractions,
    closest_keep,
    importance,
    uniform_keep,
)
from transformers import AutoModelForCausalLM

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import HIDDEN_CHANNEL, MODEL_LEVEL, KeepMask
from gisp_plugin.cli import main
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods.api import PruningJob
from gisp_plugin.methods.options import parse_options
from gisp_plugin.plugins.manager import registered
from gisp_plugin.pruning import run_method
from tests.baselines.test_shortgpt import influence_by_hand, ragged_calibration
from tests.tiny import SAMPLE_TEXT, random_ids, tiny_model

PRE_NORMS = {"llama": ("input_layernorm", "post_attention_layernorm"), "gemma2": ("input_layernorm", "pre_feedforward_layernorm")}
ALL_WIDTH = {"prune": "num_attention_heads+ffn_hidden_size+hidden_size", "channel_divisor": "8", "batch_size": "2"}


def scores_by_hand(model, family: str, calibration) -> dict[str, torch.Tensor]:
    """Minitron's scores, one unpadded sequence at a time, from modules named here."""
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for name, module in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            key = f"{name}{i}"
            handles.append(module.register_forward_pre_hook(lambda m, a, key=key: captured.setdefault(key, []).append(a[0][0])))
        for norm in PRE_NORMS[family]:
            key = f"norm{i}{norm}"
            handles.append(
                getattr(layer, norm).register_forward_hook(lambda m, a, o, key=key: captured.setdefault(key, []).append(o[0]))
            )
    with torch.no_grad():
        for ids in calibration.sequences:
            model(ids[None])
    for handle in handles:
        handle.remove()

    def aggregate(key: str) -> torch.Tensor:
        means = torch.stack([torch.mean(a.abs().double(), dim=0) for a in captured[key]])  # [sequences, d]
        return torch.linalg.vector_norm(means, dim=0)

    heads = model.config.num_attention_heads
    out = {f"heads{i}": aggregate(f"attn{i}").reshape(heads, -1).norm(dim=1) for i in range(len(model.model.layers))}
    out |= {f"mlp{i}": aggregate(f"mlp{i}") for i in range(len(model.model.layers))}
    out["hidden"] = sum(aggregate(key) for key in captured if key.startswith("norm"))
    out["layers"] = influence_by_hand(model, calibration)
    return out


def job_for(model, calibration, options: dict) -> PruningJob:
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    parsed = parse_options(MinitronOptions, options, "minitron")
    return PruningJob(model, None, adapter, anatomy, MaskedModel(model, anatomy), (0.3,), parsed, calibration)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_scores_match_an_independent_computation(family):
    model = tiny_model(family)
    calibration = ragged_calibration()  # different lengths: padded batches of 2
    job = job_for(model, calibration, ALL_WIDTH)
    got = importance(job, job.options)
    job.masked.release()
    expected = scores_by_hand(model, family, calibration)
    for i in range(3):  # float64 sums of float32 activations: agreement to 1e-6 relative
        torch.testing.assert_close(got.heads[i], expected[f"heads{i}"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got.channels[i], expected[f"mlp{i}"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.hidden, expected["hidden"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.layers, expected["layers"], rtol=1e-6, atol=1e-9)


def test_width_is_uniform_and_keeps_the_highest_scores():
    model = tiny_model("mistral")  # 8 query heads over 2 key/value groups, 32 MLP channels, hidden 48
    calibration = ragged_calibration()
    (sub,) = run_method(model, None, "minitron", [0.45], ALL_WIDTH, calibration=calibration)
    job = job_for(model, calibration, ALL_WIDTH)
    scores = importance(job, job.options)
    job.masked.release()
    anatomy = adapter_for(model).anatomy(model)
    kept_channels = {int(sub.keep[i, "mlp_channel"].sum()) for i in range(3)}
    kept_heads = {int(sub.keep[i, "attn_head"].sum()) for i in range(3)}
    assert len(kept_channels) == 1 and len(kept_heads) == 1  # the same widths in every layer
    (channels,) = kept_channels
    assert channels % 8 == 0 and channels < 32
    for i in range(3):
        top = torch.sort(scores.channels[i], descending=True, stable=True).indices[:channels]
        assert set(sub.keep[i, "mlp_channel"].nonzero().flatten().tolist()) == set(top.tolist())
        flags = sub.keep[i, "attn_head"]
        assert int(flags[:4].sum()) == int(flags[4:].sum())  # the same number of heads in each group
        for group in (range(0, 4), range(4, 8)):
            kept = [h for h in group if flags[h]]
            dropped = [h for h in group if not flags[h]]
            assert min(scores.heads[i][kept]) >= max(scores.heads[i][dropped], default=-1)
    hidden = sub.keep[MODEL_LEVEL, HIDDEN_CHANNEL]
    width = int(hidden.sum())
    assert width % 8 == 0 and width < 48
    assert set(hidden.nonzero().flatten().tolist()) == set(
        torch.sort(scores.hidden, descending=True, stable=True).indices[:width].tolist()
    )
    assert sub.sparsity == pytest.approx(anatomy.sparsity(sub.keep))


def test_depth_removes_the_lowest_scored_layers():
    model = tiny_model("llama", layers=5)
    calibration = ragged_calibration()
    (sub,) = run_method(model, None, "minitron", [0.4], {"prune": "num_layers", "batch_size": "2"}, calibration=calibration)
    order = torch.sort(influence_by_hand(model, calibration), stable=True).indices.tolist()
    assert sub.keep.removed_layers() == sorted(order[:2])


@pytest.mark.parametrize("prune", [ALL_WIDTH["prune"], "ffn_hidden_size+hidden_size+num_layers", "num_layers"])
def test_closest_keep_equals_trying_every_uniform_width(prune):
    """The bisection over candidate widths against counting every candidate (ties: the larger model)."""
    model = tiny_model("mistral", layers=4)
    anatomy = adapter_for(model).anatomy(model)
    options = parse_options(MinitronOptions, {"prune": prune, "channel_divisor": "8"}, "minitron")
    generator = torch.Generator().manual_seed(1)
    scores = Importance(
        {i: torch.rand(8, generator=generator) for i in range(4)},
        {i: torch.rand(32, generator=generator) for i in range(4)},
        torch.rand(48, generator=generator),
        torch.rand(4, generator=generator),
    )
    candidates = []
    for step in range(1000, -1, -1):
        keep = uniform_keep(anatomy, scores, options.axes, step / 1000, options.channel_divisor)
        candidates.append((anatomy.sparsity(keep), keep))
    fractions, measured = candidate_fractions(anatomy, options), {}
    for target in [i / 40 for i in range(41)]:
        best = min(candidates, key=lambda c: abs(c[0] - target))  # the first of equals: the larger model
        got = closest_keep(anatomy, scores, options, target, fractions, measured)
        assert got == best[1], target
    assert len(measured) < len(fractions) or len(fractions) < 12  # a bisection, not every candidate


def test_sums_merge_across_batches():
    generator = torch.Generator().manual_seed(0)
    acts, mask = torch.randn(4, 6, 5, generator=generator), torch.rand(4, 6, generator=generator) > 0.3
    whole, halves, other = ActivationNorms(), ActivationNorms(), ActivationNorms()
    whole.update("a", acts, mask)
    halves.update("a", acts[:2], mask[:2])
    other.update("a", acts[2:], mask[2:])
    halves.merge(other)
    torch.testing.assert_close(halves.norm("a"), whole.norm("a"))


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="prune='depth'"):
        parse_options(MinitronOptions, {"prune": "depth"}, "minitron")
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="minitron prunes dense MLPs"):
        list(run_method(model, None, "minitron", [0.3], calibration=ragged_calibration()))


def test_minitron_is_an_entry_point_plugin():
    entry = registered("method")["minitron"]
    assert entry.item.run.__module__ == "gisp_baselines.minitron"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3"])
def test_gisp_prune_end_to_end(tmp_path, tokenizer, family):
    dense_dir = tmp_path / "dense"
    tiny_model(family).save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 20)
    out = tmp_path / "out"
    args = ["prune", "--model", str(dense_dir), "--method", "minitron", "--sparsity", "0.4", "--out", str(out)]
    args += ["--calibration", f"file:{text}", "--n-samples", "8", "--seqlen", "16", "-o", "channel_divisor=8"]
    assert main(args) == 0
    folder = out / "minitron-s0.40"
    record = json.loads((folder / "pruning.json").read_text())
    assert record["method"] == "minitron" and record["info"]["hidden_size"] < 48
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert reloaded.config.hidden_size == record["info"]["hidden_size"]
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    anatomy = adapter_for(dense).anatomy(dense)
    keep = KeepMask.from_json(anatomy, record["pruned_structures"])
    ids = random_ids()
    with MaskedModel(dense, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        torch.testing.assert_close(reloaded(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_hidden_size_alone_saves_the_family_own_model(tmp_path, tokenizer):
    """Only hidden channels removed: the folder holds a plain Qwen2 model of a smaller hidden_size."""
    dense_dir = tmp_path / "dense"
    tiny_model("qwen2").save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 20)
    out = tmp_path / "out"
    args = ["prune", "--model", str(dense_dir), "--method", "minitron", "--sparsity", "0.4", "--out", str(out)]
    args += [
        "--calibration",
        f"file:{text}",
        "--n-samples",
        "8",
        "--seqlen",
        "16",
        "-o",
        "channel_divisor=8",
        "-o",
        "prune=hidden_size",
    ]
    assert main(args) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out / "minitron-s0.40", trust_remote_code=False)
    assert type(reloaded).__name__ == "Qwen2ForCausalLM" and reloaded.config.hidden_size < 48
