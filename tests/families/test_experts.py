"""Mixture-of-experts layers: expert channels, whole experts through their router rows, routing, GISP.

Tiny Mixtral, Qwen2-MoE (shared expert) and Qwen3-MoE models are built as their published checkpoints
configure them (``tests.tiny.FAMILIES``); experts are stacked 3-D tensors, as in transformers 5.
"""

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.compaction.modeling_gisp_pruned import RaggedExperts
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods.gisp import GispOptions, step_scores
from gisp_plugin.pruning import run_method
from tests.tiny import MOE_FAMILIES, random_ids, tiny_model

MOE = sorted(MOE_FAMILIES)


def _kill_experts(anatomy, layer: int, experts: list[int]) -> KeepMask:
    keep = KeepMask.dense(anatomy)
    kind = anatomy.kind(layer, "expert_channel")
    flags = keep[layer, "expert_channel"].clone()
    for e in experts:
        flags[list(kind.router_rows.readers[e])] = False
    keep[layer, "expert_channel"] = flags
    return keep


@pytest.mark.parametrize("family", MOE)
def test_expert_channels_and_router_rows(family):
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    experts = model.model.layers[0].mlp.experts
    n_experts, _, per_expert = experts.down_proj.shape
    kind = anatomy.kind(0, "expert_channel")
    assert kind.count == n_experts * per_expert and kind.block == "expert_mlp"
    assert kind.params_per_unit == 3 * model.config.hidden_size
    assert kind.router_rows.readers[1] == tuple(range(per_expert, 2 * per_expert))
    assert anatomy.dense_params == sum(p.numel() for p in model.model.layers.parameters())
    assert ("shared_channel" in anatomy.layers[0].kinds) == (family == "qwen2_moe")


def test_dense_layers_of_a_mixed_model_keep_dense_channels():
    model = tiny_model("qwen2_moe", mlp_only_layers=[1])
    anatomy = adapter_for(model).anatomy(model)
    assert set(anatomy.layers[1].kinds) == {"attn_head", "mlp_channel"}
    assert set(anatomy.layers[0].kinds) == {"attn_head", "expert_channel", "shared_channel"}
    keep = _kill_experts(anatomy, 0, [0, 2])
    ids = random_ids(2, 10)
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        expected = model(ids).logits
        compact = adapter_for(model).compact(model, keep, {})
    torch.testing.assert_close(compact(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", MOE)
def test_masked_router_never_picks_a_removed_expert(family):
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    keep = _kill_experts(anatomy, 1, [0, 1])
    routes = []
    router = model.model.layers[1].mlp.gate
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        handle = router.register_forward_hook(lambda module, args, out: routes.append(out))
        model(random_ids(2, 16))
        handle.remove()
    logits, weights, indices = routes[0]
    assert not bool(torch.isin(indices, torch.tensor([0, 1])).any())
    assert bool(torch.isinf(logits[:, :2]).all())
    if getattr(router, "norm_topk_prob", True):
        torch.testing.assert_close(weights.float().sum(-1), torch.ones(weights.shape[0]))


@pytest.mark.parametrize("family", MOE)
def test_compacted_layer_keeps_only_live_experts_of_their_own_widths(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = _kill_experts(anatomy, 0, [1])
    flags = keep[0, "expert_channel"].clone()
    per_expert = anatomy.kind(0, "expert_channel").router_rows.readers[0]
    flags[list(per_expert[:3])] = False  # expert 0 keeps all but 3 channels
    keep[0, "expert_channel"] = flags
    all_dead = _kill_experts(anatomy, 2, list(range(len(anatomy.kind(2, "expert_channel").router_rows.readers))))
    keep[2, "expert_channel"] = all_dead[2, "expert_channel"]
    compact = adapter.compact(model, keep, {})
    experts = compact.model.layers[0].mlp.experts
    n_experts = model.model.layers[0].mlp.experts.down_proj.shape[0]
    assert isinstance(experts, RaggedExperts) and len(experts) == n_experts - 1
    assert experts[0].down_proj.in_features == len(per_expert) - 3
    assert compact.model.layers[0].mlp.gate.weight.shape[0] == n_experts - 1
    assert len(compact.model.layers[2].mlp.experts) == 0 and compact.model.layers[2].mlp.gate.top_k == 0
    ids = random_ids(2, 12)
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        torch.testing.assert_close(compact(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def _calibration() -> CalibrationSet:
    ids = random_ids(4, 16, seed=3)
    return CalibrationSet("random", [ids[i] for i in range(4)])


@pytest.mark.parametrize("family", MOE)
def test_gisp_expert_channel_scores_match_plain_autograd(family):
    """|W * g| summed over each channel's gate row, up row and down column inside its expert."""
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    calibration = _calibration()
    with MaskedModel(model, anatomy):
        raw, _ = step_scores(model, anatomy, calibration, GispOptions(batch_size=2))
    fresh = tiny_model(family)
    for seq in calibration.sequences:
        (fresh(seq[None], labels=seq[None]).loss / len(calibration)).backward()
    experts = fresh.model.layers[1].mlp.experts
    per_expert = experts.down_proj.shape[2]
    gate_up = (experts.gate_up_proj * experts.gate_up_proj.grad).abs().double().sum(2)  # [E, 2I]
    down = (experts.down_proj * experts.down_proj.grad).abs().double().sum(1)  # [E, I]
    expected = (gate_up[:, :per_expert] + gate_up[:, per_expert:] + down).flatten()
    torch.testing.assert_close(raw[1, "expert_channel"], expected, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("family", MOE)
def test_gisp_with_grouped_experts_removes_whole_experts_only(family):
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    options = {"steps": "2", "group": "experts", "blocks": "expert_mlp", "protect": "none"}
    (subnetwork,) = run_method(model, None, "gisp", [0.3], options, _calibration())
    keep = subnetwork.keep
    removed_experts = 0
    for layer in anatomy.layers:
        for name, kind in layer.kinds.items():
            flags = keep[layer.index, name]
            if kind.router_rows is None:
                assert bool(flags.all()), f"{name} of layer {layer.index} is outside blocks=expert_mlp"
                continue
            for readers in kind.router_rows.readers:
                assert bool(flags[list(readers)].all()) or not bool(flags[list(readers)].any())
                removed_experts += not bool(flags[list(readers)].any())
    assert removed_experts > 0
    assert abs(anatomy.sparsity(keep) - 0.3) < 0.1


def _routing_and_inputs(model, layer: int, ids: torch.Tensor):
    """What the dense model's experts of ``layer`` receive: hidden states, chosen experts, router weights."""
    captured = {}
    experts = model.model.layers[layer].mlp.experts

    def hook(module, args):
        captured["args"] = [a.detach().clone() for a in args[:3]]

    handle = experts.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return captured["args"]


def _by_hand(model, layer: int, ids: torch.Tensor):
    """Per expert: the down-projection inputs of its routed tokens, and REAP's router-weighted output norms."""
    hidden, chosen, weights = _routing_and_inputs(model, layer, ids)
    experts = model.model.layers[layer].mlp.experts
    inputs, saliency = [], []
    for e in range(experts.down_proj.shape[0]):
        token, slot = torch.where(chosen == e)
        gate, up = (hidden[token] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        inner = experts.act_fn(gate) * up
        out = inner @ experts.down_proj[e].T
        inputs.append(inner.double())
        saliency.append((weights[token, slot].double() * out.double().norm(dim=-1)).mean() if len(token) else torch.tensor(0.0))
    return inputs, torch.stack(saliency).double()


@pytest.mark.parametrize("family", MOE)
def test_expert_statistics_are_over_the_tokens_routed_to_each_expert(family):
    from gisp_plugin.calibration.recorder import InputStatsRecorder

    model = tiny_model(family)
    ids = random_ids(3, 16, seed=4)
    inputs, saliency = _by_hand(model, 1, ids)
    experts = model.model.layers[1].mlp.experts
    with torch.no_grad(), InputStatsRecorder({"experts": experts}, routed={"experts"}) as recorder:
        model(ids)
    stats = recorder.stats["experts"]
    for e, x in enumerate(inputs):
        assert stats.experts[e].n_tokens == x.shape[0]
        if x.shape[0]:
            torch.testing.assert_close(stats.norm[e], x.norm(dim=0), rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(stats.mean[e], x.mean(0), rtol=1e-5, atol=1e-8)
        if x.shape[0] > 1:
            torch.testing.assert_close(stats.variance[e], x.var(0), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(stats.saliency, saliency, rtol=1e-5, atol=1e-8)


def test_compare_runs_on_a_tiny_mixture_of_experts(tmp_path, tokenizer):
    """`gisp compare` with an expert-level baseline beside GISP and the activation methods."""
    import csv
    import json

    from gisp_plugin.cli import main
    from tests.tiny import tiny_folder

    model_dir, text = tiny_folder(tmp_path, "mixtral", tokenizer)
    config = {
        "model": str(model_dir),
        "methods": ["gisp", "wanda_sp", "flap", "reap"],
        "method_options": {"gisp": {"steps": "2", "group": "experts"}},
        "sparsities": [0.2, 0.4],
        "evals": [f"perplexity:source=file:{text},seqlen=16,max_windows=4"],
        "calibration": f"file:{text}",
        "n_samples": 4,
        "seqlen": 16,
    }
    config_file = tmp_path / "comparison.json"
    config_file.write_text(json.dumps(config))
    out = tmp_path / "results"
    assert main(["compare", "--config", str(config_file), "--out", str(out)]) == 0
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["method"], float(r["target"])) for r in rows} == {("dense", 0.0)} | {
        (m, t) for m in ("gisp", "wanda_sp", "flap", "reap") for t in (0.2, 0.4)
    }
    metric = next(key for key in rows[0] if key.startswith("ppl"))
    assert all(float(r[metric]) > 0 for r in rows)


def test_olmoe_projection_norms_are_cut_with_their_heads():
    """OLMoE normalises the whole query/key projection: the cut norm divides by the dense width."""
    from gisp_plugin.compaction.modeling_gisp_pruned import ProjectionRMSNorm

    model = tiny_model("olmoe")
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    kind = anatomy.kind(0, "attn_head")
    assert "self_attn.q_norm.weight" in {s.path for s in kind.owned}
    keep = KeepMask.dense(anatomy)
    flags = torch.ones(kind.count, dtype=torch.bool)
    flags[[1, 4]] = False
    keep[0, "attn_head"] = flags
    compact = adapter.compact(model, keep, {})
    q_norm = compact.model.layers[0].self_attn.q_norm
    assert isinstance(q_norm, ProjectionRMSNorm)
    assert (q_norm.weight.numel(), q_norm.dense_features) == (4 * 8, 6 * 8)
    ids = random_ids(2, 12)
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        torch.testing.assert_close(compact(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_reap_on_a_dense_model_is_refused_before_calibration(tmp_path, tokenizer, capsys):
    from gisp_plugin.cli import main
    from tests.tiny import tiny_folder

    model_dir, text = tiny_folder(tmp_path, "llama", tokenizer)
    args = ["prune", "--model", str(model_dir), "--method", "reap", "--sparsity", "0.3", "--out", str(tmp_path / "out")]
    args += ["--calibration", f"file:{text}", "--n-samples", "4", "--seqlen", "16"]
    assert main(args) == 2
    assert "reap prunes routed experts; this llama model has none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", MOE)
def test_reap_removes_the_lowest_saliency_experts_of_every_layer(family):
    """The experts REAP removes are, in every layer, the ones with the lowest saliency computed by hand."""
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    calibration = _calibration()
    ids = torch.stack(calibration.sequences)
    (subnetwork,) = run_method(model, None, "reap", [0.25], {"batch_size": "4"}, calibration)
    for layer in anatomy.layers:
        _, saliency = _by_hand(model, layer.index, ids)
        readers = layer.kinds["expert_channel"].router_rows.readers
        flags = subnetwork.keep[layer.index, "expert_channel"]
        removed = [e for e, units in enumerate(readers) if not bool(flags[list(units)].any())]
        kept = [e for e, units in enumerate(readers) if bool(flags[list(units)].all())]
        assert len(removed) + len(kept) == len(readers) and removed
        assert float(saliency[removed].max()) <= float(saliency[kept].min())


def test_compare_leaves_out_methods_that_do_not_apply_unless_named(tmp_path, tokenizer):
    from gisp_plugin.harness.config import ComparisonConfig, ConfigError
    from gisp_plugin.harness.runner import Comparison
    from tests.tiny import tiny_folder

    model_dir, text = tiny_folder(tmp_path, "llama", tokenizer)
    values = {
        "model": str(model_dir),
        "evals": [f"perplexity:source=file:{text},seqlen=16"],
        "calibration": f"file:{text}",
        "n_samples": 4,
        "seqlen": 16,
    }
    every = Comparison(ComparisonConfig.from_mapping(values), tmp_path / "all")
    assert "reap" not in every.methods and {"gisp", "wanda_sp", "flap", "magnitude"} <= set(every.methods)
    with pytest.raises(ConfigError, match="method 'reap' does not apply to .*has none"):
        Comparison(ComparisonConfig.from_mapping({**values, "methods": ["gisp", "reap"]}), tmp_path / "named")


def test_compare_on_a_mixture_of_experts_runs_the_removal_methods_and_leaves_out_slimgpt(tmp_path, tokenizer, caplog):
    """SLEB and BlockPruner remove layers and blocks of MoE layers too; SlimGPT refuses routed experts, so a
    comparison of every method leaves it out with a log line naming it, and naming it is an error."""
    import logging

    from gisp_plugin.harness.config import ComparisonConfig, ConfigError
    from gisp_plugin.harness.runner import Comparison, run_comparison
    from tests.tiny import tiny_folder

    model_dir, text = tiny_folder(tmp_path, "qwen2_moe", tokenizer)
    values = {
        "model": str(model_dir),
        "methods": ["all"],  # every registered method (the default list is curated)
        "evals": [f"perplexity:source=file:{text},seqlen=16,max_windows=4"],
        "calibration": f"file:{text}",
        "n_samples": 4,
        "seqlen": 16,
        "sparsities": [0.3],
    }
    with caplog.at_level(logging.INFO, logger="gisp_plugin.harness.runner"):
        every = Comparison(ComparisonConfig.from_mapping(values), tmp_path / "all")
    assert "slimgpt" not in every.methods and {"sleb", "blockpruner"} <= set(every.methods)
    assert "leaving out slimgpt: slimgpt does not prune routed experts" in caplog.text
    with pytest.raises(ConfigError, match="method 'slimgpt' does not apply to .*slimgpt does not prune routed experts"):
        Comparison(ComparisonConfig.from_mapping({**values, "methods": ["sleb", "slimgpt"]}), tmp_path / "named")
    result = run_comparison(ComparisonConfig.from_mapping({**values, "methods": ["sleb", "blockpruner"]}), tmp_path / "run")
    assert sorted({row.method for row in result.rows} - {"dense"}) == ["blockpruner", "sleb"]
