"""Layer-wise onloading: one layer at a time, the in-memory results, the model put back, real memory saved."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from gisp_plugin.calibration.onloading import LayerPlacement, OnloadError, empty_model, read_tensor
from gisp_plugin.calibration.sequential import SequentialCalibration
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.methods.options import OptionError
from gisp_plugin.pruning import compact_subnetwork, run_method
from tests.baselines.independent import calibration_ids
from tests.tiny import random_ids, tiny_model

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "onloading_memory.py"
sys.path.insert(0, str(BENCHMARK.parent))

from onloading_memory import benchmark, parse_args  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("onloading") / "llama"
    tiny_model("llama", layers=4, intermediate_size=64).save_pretrained(path)
    return path


def test_read_tensor_reads_what_safetensors_wrote(tmp_path):
    tensors = {
        "weight": torch.randn(3, 5),
        "bf16": torch.randn(7).bfloat16(),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    for name, tensor in tensors.items():
        read = read_tensor(tmp_path / "model.safetensors", name)
        assert read.dtype == tensor.dtype and torch.equal(read, tensor), name


def test_disk_walk_holds_one_layer_and_puts_the_model_back(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    layers = model.model.layers
    placement = LayerPlacement(model, layers, "disk", "cpu")
    walk = SequentialCalibration(
        model, layers, CalibrationSet("ids", list(calibration_ids(4))), ["mlp.down_proj"], progress=False, placement=placement
    )
    for stats in walk:
        real = [all(p.device.type != "meta" for p in layer.parameters()) for layer in layers]
        assert real == [i == stats.index for i in range(len(layers))]  # only the current layer has weights
        assert model.model.embed_tokens.weight.device.type == "cpu"
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # read back from disk, unchanged


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("wanda_sp", {}),
        ("wanda_sp", {"sequential": "false"}),
        ("owl_sp", {"spread": "0.1"}),
        ("flap", {}),
        ("flap", {"structure": "UL-UM", "propagate": "pruned"}),
    ],
)
def test_disk_and_cpu_onloading_choose_what_the_in_memory_run_chooses(folder, method, options):
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    results = {}
    for onload in ("off", "cpu", "disk"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        (sub,) = run_method(model, None, method, [0.4], {**options, "onload": onload}, calibration=calibration)
        compact, _ = compact_subnetwork(model, sub)  # the model is whole again: compaction works
        with torch.no_grad():
            results[onload] = (sub.keep, sub.extra_biases, compact(random_ids(2, 8)).logits)
    for onload in ("cpu", "disk"):  # the same arithmetic on the same weights: equal, not merely close
        assert results[onload][0] == results["off"][0]
        assert results[onload][1].keys() == results["off"][1].keys()
        assert all(torch.equal(results[onload][1][k], results["off"][1][k]) for k in results["off"][1])
        assert torch.equal(results[onload][2], results["off"][2])


def test_a_model_that_never_held_its_layers_prunes_the_same(folder):
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    (in_memory,) = run_method(AutoModelForCausalLM.from_pretrained(folder), None, "wanda_sp", [0.4], {}, calibration=calibration)
    model = empty_model(folder)
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())
    (onloaded,) = run_method(model, None, "wanda_sp", [0.4], {"onload": "disk"}, calibration=calibration)
    assert onloaded.keep == in_memory.keep
    assert all(p.device.type == "meta" for p in model.model.layers.parameters())  # back where they were: on disk


def test_refusals_name_the_problem(tmp_path):
    moe = tiny_model("qwen2_moe", layers=2)
    moe.save_pretrained(tmp_path / "moe")  # transformers saves routed experts one by one, the model stacks them
    with pytest.raises(OnloadError, match="stores no tensor for .*experts.*onload=cpu"):
        LayerPlacement(moe, moe.model.layers, "disk", "cpu", checkpoint=tmp_path / "moe")
    with pytest.raises(OnloadError, match="has none"):
        LayerPlacement(moe, moe.model.layers, "disk", "cpu", checkpoint=tmp_path)
    with pytest.raises(OptionError, match="onload_device='cdua'"):
        list(run_method(moe, None, "wanda_sp", [0.3], {"onload": "cpu", "onload_device": "cdua"}))
    with pytest.raises(OptionError, match="onload='gpu' is not one of off, cpu, disk"):
        list(run_method(moe, None, "flap", [0.3], {"onload": "gpu"}))


def test_cpu_onloading_runs_mixture_of_experts():
    model = tiny_model("olmoe", layers=2)
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    (off,) = run_method(model, None, "owl_sp", [0.3], {}, calibration=calibration)
    (cpu,) = run_method(model, None, "owl_sp", [0.3], {"onload": "cpu"}, calibration=calibration)
    assert off.keep == cpu.keep


def test_disk_onloading_peak_memory_stays_near_one_layer(tmp_path):
    # 12 layers of 9.4 MB: the in-memory run holds all of them at once, the onloaded one one or two.
    # Measured for real: each run is a fresh process reading its own peak
    # resident memory (VmHWM), as benchmarks/onloading_memory.py does.
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=6,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    result = benchmark(parse_args(["--samples", "8", "--seqlen", "32", "--threads", "1"]), tmp_path / "model")
    sizes, rows = result["sizes"], {row["mode"]: row for row in result["rows"]}
    assert rows["in_memory"]["masks_sha"] == rows["disk"]["masks_sha"]
    saved = rows["in_memory"]["peak_above_start_mb"] - rows["disk"]["peak_above_start_mb"]
    # everything both runs share (imports, the first forward, allocator arenas) cancels in the difference;
    # onloading must save at least the layers beyond three
    assert saved >= (sizes["layers"] - 3) * sizes["one_layer_mb"], (saved, sizes, rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: layers onloaded from CPU memory to it")
def test_cpu_storage_runs_each_layer_on_the_gpu_and_holds_one_layer_there():
    model = tiny_model("llama", layers=8, intermediate_size=512)  # on the CPU, where it stays
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    (reference,) = run_method(model, None, "wanda_sp", [0.4], {}, calibration=calibration)
    torch.cuda.reset_peak_memory_stats()
    options = {"onload": "cpu", "onload_device": "cuda"}
    (onloaded,) = run_method(model, None, "wanda_sp", [0.4], options, calibration=calibration)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    outside = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." not in n)
    assert torch.cuda.max_memory_allocated() < outside + 3 * layer_bytes + 2**20  # + activations of 4 x 16 tokens
    assert all(p.device.type == "cpu" for p in model.parameters())  # back where it was
    # GPU kernels round differently from the CPU's: a near-tie may flip, so compare decisions, not bits
    agree = [bool((onloaded.keep[key] == flags).float().mean() >= 0.9) for key, flags in reference.keep.flags.items()]
    assert all(agree)
