"""GISP with hidden channels in its global list (``blocks=...+hidden``), and the default left as it was.

Hidden-channel scores are checked against plain autograd over tensors named here (embedding columns, q/k/v,
gate/up columns, o/down rows, norm entries, LM-head columns); masks against their compaction (logits and
greedy generation with the key/value cache); the default run against masks recorded before the option
existed (``data/gisp_default_masks.json``, written by the same cases on the commit before it).
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import HIDDEN_CHANNEL, MODEL_LEVEL, KeepMask
from gisp_plugin.cli import main
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.importance.allocation import UnreachableTargetError, prune_lowest_globally
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods.gisp import GispOptions, check_options, cut_exact, hidden_group_scores, step_scores
from gisp_plugin.methods.options import OptionError
from gisp_plugin.pruning import resolve_method, run_method
from tests.baselines.independent import calibration_ids, gradients
from tests.tiny import SAMPLE_TEXT, random_ids, tiny_model

HIDDEN = (MODEL_LEVEL, HIDDEN_CHANNEL)
GOLDEN = Path(__file__).parent / "data" / "gisp_default_masks.json"


def calibration_set(n: int = 6, seed: int = 1) -> CalibrationSet:
    ids = random_ids(n, 16, seed=seed)
    return CalibrationSet("random", [ids[i, : 10 + i] for i in range(n)])


@pytest.mark.parametrize("family", sorted(json.loads(GOLDEN.read_text())))
def test_default_runs_give_the_masks_recorded_before_hidden_channels(family):
    """Same model, data, options and seed as when the masks were recorded: the same masks, bit for bit."""
    case = json.loads(GOLDEN.read_text())[family]
    torch.manual_seed(0)
    model = tiny_model(family, layers=4)
    subs = run_method(model, None, "gisp", [0.2, 0.4], case["options"], calibration_set(), seed=0)
    got = {str(sub.target): sub.keep.to_json() for sub in subs}
    assert got == case["masks"]
    assert all(str(HIDDEN[0]) not in masks for masks in got.values())  # no hidden flags unless asked for


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied and tied embeddings
def test_hidden_scores_match_plain_autograd(family):
    """|W * g| summed over every weight a hidden channel owns, by hand on named tensors."""
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    ids = calibration_ids(4)
    raw, _ = step_scores(model, anatomy, CalibrationSet("ids", list(ids)), GispOptions(blocks="all+hidden"))
    grads, _ = gradients(model, ids, False)
    weights = dict(model.named_parameters())

    def score(name: str, axis: int) -> torch.Tensor:
        s = (weights[name].detach().double() * grads[name].double()).abs()
        return s.sum(0) if axis == 1 else s.sum(1) if s.dim() == 2 else s

    expected = score("model.embed_tokens.weight", 1) + score("model.norm.weight", 0)
    if not model.config.tie_word_embeddings:
        expected += score("lm_head.weight", 1)
    for i in range(len(model.model.layers)):
        prefix = f"model.layers.{i}"
        for reader in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            expected += score(f"{prefix}.{reader}.weight", 1)
        for writer in ("self_attn.o_proj", "mlp.down_proj"):
            expected += score(f"{prefix}.{writer}.weight", 0)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expected += score(f"{prefix}.{norm}.weight", 0)
    torch.testing.assert_close(raw[HIDDEN], expected, rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gisp_removes_hidden_channels_and_the_mask_equals_the_compaction(family):
    model = tiny_model(family, layers=4)
    anatomy = adapter_for(model).anatomy(model)
    options = {"steps": "2", "protect": "none", "blocks": "all+hidden", "normalize": "block_mean"}
    targets = [0.3, 0.5]
    subs = list(run_method(model, None, "gisp", targets, options, calibration_set(), seed=0))
    heads = model.config.num_attention_heads
    widths = []
    for sub, target in zip(subs, targets, strict=True):
        kept = int(sub.keep[HIDDEN].sum())
        widths.append(kept)
        assert kept % heads == 0 and kept < anatomy.hidden.width  # whole groups of the head count
        assert sub.sparsity == pytest.approx(anatomy.sparsity(sub.keep))
        # within half a group of hidden channels (the largest entry of the ranking) of the target
        assert abs(sub.sparsity - target) <= 0.5 * heads * anatomy.hidden.kind.params_per_unit / anatomy.dense_params
    assert subs[1].keep.is_subset_of(subs[0].keep)  # nested, hidden channels included
    assert any(not bool(flags.all()) for key, flags in subs[1].keep.flags.items() if key != HIDDEN)

    ids = random_ids(2, 10, 3)
    keep = subs[1].keep
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        expected = model(ids).logits
        generated = model.generate(
            ids[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=8, do_sample=False
        )
    compact = adapter_for(model).compact(model, keep)
    assert compact.config.hidden_size == widths[1]
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, expected, rtol=1e-5, atol=1e-5)
    got = compact.generate(ids[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=8, do_sample=False)
    assert torch.equal(got, generated)


def test_the_cut_is_the_prefix_of_the_ranking_closest_in_exact_sparsity():
    """``cut_exact`` (bisection) against every prefix of the same ranking, found on a fine grid of allocator
    targets and counted exactly."""
    model = tiny_model("mistral")
    anatomy = adapter_for(model).anatomy(model)
    generator = torch.Generator().manual_seed(3)
    ranked = {key: torch.rand(anatomy.kind(*key).count, generator=generator, dtype=torch.float64) for key in anatomy.units()}
    ranked[HIDDEN] = hidden_group_scores(torch.rand(48, generator=generator, dtype=torch.float64), hidden_groups_of(48, 8))
    groups = {HIDDEN: hidden_groups_of(48, 8)}
    prefixes = {}
    for step in range(1, 1500):
        try:
            keep = prune_lowest_globally(anatomy, ranked, step / 1000, groups)
        except UnreachableTargetError:
            break
        prefixes[keep.num_pruned()] = anatomy.sparsity(keep)
    for target in (0.15, 0.3, 0.45, 0.6):
        got = anatomy.sparsity(cut_exact(anatomy, ranked, target, groups))
        best = min(prefixes.values(), key=lambda value: abs(value - target))
        assert abs(got - target) == pytest.approx(abs(best - target), abs=1e-12)
        additive = anatomy.sparsity(prune_lowest_globally(anatomy, ranked, target, groups))
        assert abs(got - target) <= abs(additive - target)


def hidden_groups_of(width: int, size: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(i, i + size)) for i in range(0, width, size))


def test_hidden_alone_saves_in_the_family_own_config(tmp_path, tokenizer):
    """``blocks=hidden``: only the width goes; the folder holds a plain Llama model and reloads without remote code."""
    dense_dir = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 20)
    out = tmp_path / "out"
    args = ["prune", "--model", str(dense_dir), "--method", "gisp", "--sparsity", "0.25", "--out", str(out)]
    args += ["--calibration", f"file:{text}", "--n-samples", "4", "--seqlen", "16"]
    args += ["-o", "blocks=hidden", "-o", "steps=2", "-o", "protect=none"]
    assert main(args) == 0
    folder = out / "gisp-s0.25"
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert reloaded.config.hidden_size < 48 and reloaded.config.hidden_size % 6 == 0
    record = json.loads((folder / "pruning.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    anatomy = adapter_for(dense).anatomy(dense)
    keep = KeepMask.from_json(anatomy, record["pruned_structures"])
    assert int(keep[HIDDEN].sum()) == reloaded.config.hidden_size
    assert all(bool(flags.all()) for key, flags in keep.flags.items() if key != HIDDEN)  # nothing else removed
    ids = random_ids()
    with MaskedModel(dense, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        torch.testing.assert_close(reloaded(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"blocks": "all+heads"}, "blocks='all+heads': give all, or block types joined by +"),
        ({"blocks": "all+attention"}, "blocks='all+attention': give all"),
        ({"blocks": "all+hidden", "rank": "separate"}, "ranks hidden channels in the one global list; give rank=global"),
        ({"blocks": "hidden", "hidden_divisor": "-1"}, "hidden_divisor=-1 must be >= 0"),
    ],
)
def test_option_errors_are_one_line(options, message):
    with pytest.raises(OptionError) as caught:
        resolve_method("gisp", options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_model_dependent_refusals_are_one_line():
    model = tiny_model("llama")  # hidden 48, 6 heads
    anatomy = adapter_for(model).anatomy(model)
    for options, message in (
        (GispOptions(blocks="all+hidden", hidden_divisor=5), "hidden_divisor=5 does not divide the hidden size 48"),
        (GispOptions(blocks="hidden", steps=8), "steps=8 is more than the 7 structures"),  # 48 / 6 groups, one stays
    ):
        with pytest.raises(ValueError) as caught:
            check_options(anatomy, options)
        assert message in str(caught.value) and "\n" not in str(caught.value)
    check_options(anatomy, GispOptions(blocks="hidden", steps=7))
