"""Shape constraints (``--shape``): every method's masks obey the shape, ``uniform`` compacts to equal layers,
GISP under ``even-groups`` is the brute-force constrained ranking, the choice is recorded, and bad shapes
are refused before any model loads.

The masks are checked against the model's config (query head ``h`` reads key/value head
``h // (heads / kv_heads)``, as transformers' ``repeat_kv``), not against ``shapes.violation``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.cli import main
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.harness.config import ComparisonConfig, ConfigError
from gisp_plugin.importance.allocation import UnreachableTargetError, prune_lowest_globally
from gisp_plugin.importance.shapes import ShapeError, violation
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods.gisp import GispOptions, normalize_scores, ranking_scores, step_scores
from gisp_plugin.methods.global_ranking import previous_first
from gisp_plugin.plugins.manager import lookup
from gisp_plugin.pruning import TARGET_SLACK, compact_subnetwork, run_method
from tests.baselines.independent import calibration_ids
from tests.tiny import tiny_model

GQA_FAMILIES = ["mistral", "qwen2", "qwen3", "phi4mini"]
SHAPES = ["even-groups", "kv-groups", "uniform"]
METHODS = {
    "gisp": {"steps": 2, "protect": "none"},  # uniform: a protected layer keeps every layer whole
    "wanda_sp": {},
    "flap": {},
    "llm_pruner": {"layer_start": 0, "layer_end": 3, "head_unit": "query_head"},  # every layer; heads one by one
    "magnitude": {},
    "random": {},
}
GLOBAL = {"gisp", "flap", "magnitude", "random"}  # one global ranking: targets met to within one unit
_models: dict[str, torch.nn.Module] = {}


def model_of(family: str):
    """A tiny model whose MLP holds most parameters, as in real models: the MLP channels left at 40% can
    fill the gap a move of several heads leaves (a cut never overshoots; with no MLP left it stops short)."""
    if family not in _models:
        _models[family] = tiny_model(family, intermediate_size=96)
    return _models[family]


@pytest.fixture(scope="module")
def calibration():
    return CalibrationSet("ids", list(calibration_ids()))


def group_counts(model, flags: torch.Tensor) -> list[int]:
    """Query heads kept per key/value group, from the config's head counts."""
    config = model.config
    return flags.view(config.num_key_value_heads, -1).sum(1).tolist()


def check_shape(model, keep: KeepMask, shape: str) -> None:
    """The shape's rule, read straight from the keep flags and the config."""
    config = model.config
    size = config.num_attention_heads // config.num_key_value_heads
    layers = []
    for layer in range(config.num_hidden_layers):
        counts = group_counts(model, keep[layer, "attn_head"])
        alive = [c for c in counts if c]
        if shape == "kv-groups":
            assert set(counts) <= {0, size}, (layer, counts)
        assert len(set(alive)) <= 1, (layer, counts)
        layers.append((len(alive), alive[0] if alive else 0, int(keep[layer, "mlp_channel"].sum())))
    if shape == "uniform":
        assert len(set(layers)) == 1, layers


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_every_mask_obeys_the_shape(family, shape, method, calibration):
    model = model_of(family)
    anatomy = adapter_for(model).anatomy(model)
    subnetworks = list(run_method(model, None, method, [0.2, 0.4], METHODS[method], calibration, shape=shape))
    for subnetwork in subnetworks:
        check_shape(model, subnetwork.keep, shape)
        assert violation(anatomy, subnetwork.keep, shape) is None
        if method in GLOBAL and shape != "uniform":
            assert abs(subnetwork.sparsity - subnetwork.target) <= TARGET_SLACK
    if lookup("method", method).nested:
        assert subnetworks[1].keep.is_subset_of(subnetworks[0].keep)
    assert subnetworks[1].sparsity > subnetworks[0].sparsity


def test_the_constraint_changes_what_free_would_prune(calibration):
    # The check above could pass on masks that keep every head: under free, magnitude prunes heads that
    # break even groups on this model, and under even-groups it still prunes heads, in equal numbers.
    model = model_of("mistral")
    free = list(run_method(model, None, "magnitude", [0.2, 0.4], shape="free"))
    even = list(run_method(model, None, "magnitude", [0.2, 0.4], shape="even-groups"))
    layers = range(model.config.num_hidden_layers)
    assert any(len({c for c in group_counts(model, s.keep[i, "attn_head"]) if c}) > 1 for s in free for i in layers)
    assert any(not bool(s.keep[i, "attn_head"].all()) for s in even for i in layers)


def layer_shapes(compact) -> list[dict[str, tuple[int, ...]]]:
    return [{name: tuple(t.shape) for name, t in layer.state_dict().items()} for layer in compact.model.layers]


@pytest.mark.parametrize(
    ("family", "method"),
    [("qwen2", "gisp"), ("qwen2", "wanda_sp"), ("phi4mini", "magnitude"), ("mixtral", "gisp"), ("qwen2_moe", "wanda_sp")],
)
def test_uniform_compacts_to_equal_layers(family, method, calibration):
    model = tiny_model(family)
    options = METHODS.get(method, {})
    dense = layer_shapes(model)
    for subnetwork in run_method(model, None, method, [0.2, 0.4], options, calibration, shape="uniform"):
        compact, params = compact_subnetwork(model, subnetwork)
        shapes = layer_shapes(compact)
        assert all(s == shapes[0] for s in shapes), f"{family} {method} at {subnetwork.target}: layers differ"
        assert shapes[0] != dense[0]  # really pruned
        assert params["decoder"] < params["decoder_dense"]


# --- GISP under even-groups is the brute-force constrained ranking ---------------------------------------------


def feasible(flags: torch.Tensor, size: int, shape: str) -> bool:
    counts = flags.view(-1, size).sum(1)
    if shape == "kv-groups":
        return bool(((counts == 0) | (counts == size)).all())
    alive = counts[counts > 0]
    return alive.numel() == 0 or bool((alive == alive[0]).all())


def minimal_removals(flags: torch.Tensor, size: int, shape: str) -> list[tuple[int, ...]]:
    """Every smallest set of live heads whose removal leaves a feasible layer (by enumeration)."""
    live = flags.nonzero().flatten().tolist()
    found: list[tuple[int, ...]] = []
    for count in range(1, len(live) + 1):
        for removed in itertools.combinations(live, count):
            if any(set(smaller) <= set(removed) for smaller in found):
                continue
            trial = flags.clone()
            trial[list(removed)] = False
            if feasible(trial, size, shape):
                found.append(removed)
    return found


def brute_force(anatomy, scores, target: float, size: int, shape: str) -> KeepMask:
    """Greedy over explicit masks: remove the feasible minimal set with the lowest mean score anywhere; a
    removal that would overshoot the target by more than half the smallest unit freezes its layer's kind."""
    keep = KeepMask.dense(anatomy)
    tolerance = 0.5 * min(anatomy.kind(*key).params_per_unit for key in scores) / anatomy.dense_params
    frozen: set = set()
    while True:
        best = None
        for key in sorted(set(scores) - frozen):
            flags = keep[key]
            if key[1] == "attn_head":
                moves = minimal_removals(flags, size, shape)
            else:
                moves = [(u,) for u in flags.nonzero().flatten().tolist()]
            for removed in moves:
                mean = float(scores[key][list(removed)].double().mean())
                if best is None or mean < best[0]:
                    best = (mean, key, removed)
        if best is None:
            return keep
        _, key, removed = best
        trial = keep.copy()
        flags = trial[key].clone()
        flags[list(removed)] = False
        trial[key] = flags
        if anatomy.sparsity(trial) > target + tolerance:
            frozen.add(key)
        else:
            keep = trial


@pytest.mark.parametrize("target", [0.15, 0.3])
def test_gisp_even_groups_is_the_brute_force_ranking(target, calibration):
    model = tiny_model("qwen2", intermediate_size=12)  # 6 heads in 2 groups of 3; few channels to enumerate
    anatomy = adapter_for(model).anatomy(model)
    options = GispOptions(steps=1, protect="none")
    with MaskedModel(model, anatomy) as masked:  # GISP's first pass: the dense model wearing its masks
        masked.apply(KeepMask.dense(anatomy))
        torch.manual_seed(0)
        raw, _ = step_scores(model, anatomy, calibration, options)
    dense = KeepMask.dense(anatomy)
    ranked = ranking_scores(anatomy, normalize_scores(model, anatomy, raw, options.normalize, dense, []), dense, [])
    expected = brute_force(anatomy, ranked, target, 3, "even-groups")
    (got,) = run_method(model, None, "gisp", [target], {"steps": 1, "protect": "none"}, calibration, shape="even-groups")
    assert got.keep == expected
    assert any(not bool(got.keep[i, "attn_head"].all()) for i in range(3))  # heads compete, and some go


@pytest.mark.parametrize("shape", ["even-groups", "kv-groups"])
def test_global_allocator_is_the_brute_force_ranking_on_random_scores(shape):
    model = tiny_model("mistral", intermediate_size=8)  # 8 heads in 2 groups of 4
    anatomy = dataclasses.replace(adapter_for(model).anatomy(model), shape=shape)
    generator = torch.Generator().manual_seed(1)
    for trial in range(3):
        scores = {key: torch.rand(anatomy.kind(*key).count, generator=generator, dtype=torch.float64) for key in anatomy.units()}
        for key in scores:
            if key[1] == "mlp_channel":
                scores[key] = scores[key] + 0.3  # heads and channels interleave in the ranking
        for target in (0.1, 0.25, 0.4):
            assert prune_lowest_globally(anatomy, scores, target) == brute_force(anatomy, scores, target, 4, shape), (
                trial,
                target,
            )


# --- records and resume ------------------------------------------------------------------------------------------


def test_shape_is_recorded_and_a_resume_with_another_shape_is_another_run(tmp_path, tokenizer, capsys):
    folder = tmp_path / "tiny-qwen2"
    tiny_model("qwen2").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    args = ["prune", "--model", folder, "--method", "magnitude", "--sparsity", "0.2,0.4", "--out", out]
    assert main([str(a) for a in [*args, "--shape", "even-groups"]]) == 0
    for target in ("0.20", "0.40"):
        assert json.loads((out / f"magnitude-s{target}" / "pruning.json").read_text())["shape"] == "even-groups"
    assert json.loads((out / "trajectory.json").read_text())["shape"] == "even-groups"
    capsys.readouterr()
    assert main([str(a) for a in [*args, "--shape", "kv-groups"]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 2 and "--overwrite" in err


def test_gisp_ignores_a_resume_state_of_another_shape(tmp_path, calibration, caplog):
    model = model_of("qwen2")
    options = {"steps": 2, "protect": "none"}
    list(run_method(model, None, "gisp", [0.3], options, calibration, work_dir=tmp_path, shape="even-groups"))
    with caplog.at_level(logging.WARNING):
        (resumed,) = run_method(model, None, "gisp", [0.3], options, calibration, work_dir=tmp_path, shape="kv-groups")
    assert "different run" in caplog.text
    (fresh,) = run_method(model, None, "gisp", [0.3], options, calibration, shape="kv-groups")
    assert resumed.keep == fresh.keep


# --- bad values: one clear line, before any model loads -----------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_an_unknown_shape_is_one_line_before_loading(command, tmp_path, capsys):
    args = ["--model", tmp_path / "no-such-model", "--out", tmp_path / "out", "--shape", "even"]
    if command == "prune":
        args += ["--method", "magnitude", "--sparsity", "0.2"]
    assert main([command, *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "shape 'even' is not one of free, even-groups, kv-groups, uniform" in err.splitlines()[0]
    assert not (tmp_path / "out").exists()


def test_an_unknown_shape_in_a_comparison_file_names_the_file(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text("shape: uniformly\n")
    with pytest.raises(ConfigError, match=r"compare.yaml: shape 'uniformly' is not one of free, even-groups"):
        ComparisonConfig.from_file(path)


def test_the_python_api_refuses_an_unknown_shape():
    with pytest.raises(ShapeError, match="shape 'GGUF' is not one of"):
        list(run_method(model_of("mistral"), None, "magnitude", [0.2], shape="GGUF"))


def test_uniform_names_the_option_that_lets_a_method_prune_every_layer(calibration):
    model = model_of("qwen2")
    with pytest.raises(ShapeError, match="layer_start=0"):
        list(run_method(model, None, "llm_pruner", [0.2], {"layer_start": 1, "layer_end": 3}, calibration, shape="uniform"))
    with pytest.raises(UnreachableTargetError, match="protect=none"):  # gisp's reference protection on 3 layers
        list(run_method(model, None, "gisp", [0.2], {"steps": 1}, calibration, shape="uniform"))


def test_cuts_from_the_previous_one_stay_nested_under_uniform():
    # Under uniform a move of heads spans every layer; the cut passes over it while it overshoots and
    # fills with MLP channels, then takes it at a larger target: a fixed ranking cut afresh would give
    # back channels. Ranking the previous cut's units first (cut_at_every_target) keeps every cut nested.
    model = tiny_model("qwen2", intermediate_size=24)
    anatomy = dataclasses.replace(adapter_for(model).anatomy(model), shape="uniform")
    generator = torch.Generator().manual_seed(3)
    scores = {key: torch.rand(anatomy.kind(*key).count, generator=generator, dtype=torch.float64) for key in anatomy.units()}
    keep = None
    for target in torch.arange(0.05, 0.6, 0.01).tolist():
        ranked = scores if keep is None else previous_first(scores, keep)
        cut = prune_lowest_globally(anatomy, ranked, target)
        assert keep is None or cut.is_subset_of(keep), target
        assert violation(anatomy, cut, "uniform") is None
        keep = cut
