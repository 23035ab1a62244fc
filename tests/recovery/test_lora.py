"""LoRA recovery: a few steps lower the calibration loss, and the merged model is a plain model again."""

import pytest
import torch
from torch import nn

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.pruning import compact_subnetwork, run_method
from gisp_plugin.recovery.lora import RecoveryOptions, RecoveryReport, adaptable_modules, calibration_loss, recover
from tests.tiny import tiny_model


def calibration(n=8, seq=16, seed=0) -> CalibrationSet:
    generator = torch.Generator().manual_seed(seed)
    return CalibrationSet("ids", [torch.randint(3, 320, (seq,), generator=generator) for _ in range(n)])


def test_recovery_lowers_loss_and_merges_back_into_plain_linears():
    model = tiny_model("qwen2")
    (sub,) = run_method(model, None, "magnitude", [0.5])
    sub.keep[1, "attn_head"] = torch.zeros_like(sub.keep[1, "attn_head"])  # a fully pruned block: no adapter there
    compact, _ = compact_subnetwork(model, sub)
    types = {name: type(module) for name, module in compact.named_modules()}
    shapes = {name: p.shape for name, p in compact.named_parameters()}
    flags = {name: p.requires_grad for name, p in compact.named_parameters()}
    data = calibration()

    before = calibration_loss(compact, data)
    report = RecoveryReport()
    recovered = recover(compact, None, data, RecoveryOptions(steps=12, lr=1e-2, batch_size=4), report)
    after = calibration_loss(recovered, data)

    assert len(report.losses) == 12
    assert after < before - 0.05
    assert "model.layers.1.self_attn.q_proj" not in report.modules  # zero-size projections are skipped
    assert "model.layers.0.self_attn.q_proj" in report.modules
    assert {name: type(module) for name, module in recovered.named_modules()} == types
    assert {name: p.shape for name, p in recovered.named_parameters()} == shapes
    assert {name: p.requires_grad for name, p in recovered.named_parameters()} == flags
    assert not any("lora" in name for name, _ in recovered.named_parameters())


def test_recovery_changes_only_adapted_weights():
    model = tiny_model("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    recovered = recover(model, None, calibration(), RecoveryOptions(steps=3, lr=1e-2, targets=("down_proj",)))
    for name, p in recovered.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == name.endswith("mlp.down_proj.weight"), name


def test_masked_models_and_bad_options_are_refused():
    model = tiny_model("llama")
    anatomy = adapter_for(model).anatomy(model)
    with MaskedModel(model, anatomy), pytest.raises(ValueError, match="still wears pruning masks"):
        adaptable_modules(model, ("q_proj",))
    with pytest.raises(ValueError, match="no linear layer named"):
        adaptable_modules(model, ("nothing",))
    with pytest.raises(ValueError, match="lr must be > 0"):
        RecoveryOptions(lr=0)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
