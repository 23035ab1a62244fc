"""Independent, deliberately plain re-computations of the baselines for the tests.

Nothing here uses the calibration engine, the channel-score helpers or the Taylor module: inputs are
captured by hooks on full forward passes of a copy of the model, pruned units are zeroed in the copy's
weights, gradients come from one ``loss.backward()``. Equal-length calibration sequences, so there is
no padding to think about.
"""

from __future__ import annotations

import copy

import torch

CALIBRATION_LENGTH = 16


def calibration_ids(n: int = 6, seq: int = CALIBRATION_LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (n, seq), generator=torch.Generator().manual_seed(seed))


def capture_inputs(model, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Every token's input to each named module over one full forward pass: ``{name: [tokens, in]}``."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles.append(
            module.register_forward_pre_hook(
                lambda m, args, name=name: got.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
            )
        )
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return {name: value.double() for name, value in got.items()}


def zero_units(layer, heads: list[int], channels: list[int]) -> None:
    """Remove heads / channels from a layer's outputs by zeroing their o_proj / down_proj columns."""
    d = layer.self_attn.head_dim
    with torch.no_grad():
        for h in heads:
            layer.self_attn.o_proj.weight[:, h * d : (h + 1) * d] = 0
        layer.mlp.down_proj.weight[:, channels] = 0


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    return torch.sort(scores, stable=True).indices[:n].tolist()


def wanda_sp_reference(model, ids: torch.Tensor, n_heads: int, n_channels: int, sequential: bool = True):
    """Per-layer pruned heads and channels of Wanda-sp (|W| * ||X||, mean over rows, head = sum)."""
    work = copy.deepcopy(model)
    pruned = []
    for i, layer in enumerate(work.model.layers):
        names = [f"model.layers.{i}.self_attn.o_proj", f"model.layers.{i}.mlp.down_proj"]
        x = capture_inputs(work if sequential else model, ids, names)
        w_o = layer.self_attn.o_proj.weight.detach().double()
        w_d = layer.mlp.down_proj.weight.detach().double()
        head_channel = (w_o.abs() * x[names[0]].norm(dim=0)).mean(0)
        heads = head_channel.reshape(-1, layer.self_attn.head_dim).sum(1)
        channels = (w_d.abs() * x[names[1]].norm(dim=0)).mean(0)
        decision = (lowest(heads, n_heads), lowest(channels, n_channels))
        zero_units(layer, *decision)
        pruned.append(decision)
    return pruned


def flap_channel_metrics(model, ids: torch.Tensor, square_attention: bool = True):
    """Per layer: (attention channel WIFV, MLP channel WIFV, o_proj input mean, down_proj input mean)."""
    names = [f"model.layers.{i}.{m}" for i in range(len(model.model.layers)) for m in ("self_attn.o_proj", "mlp.down_proj")]
    x = capture_inputs(model, ids, names)
    out = []
    for i, layer in enumerate(model.model.layers):
        xo, xd = x[f"model.layers.{i}.self_attn.o_proj"], x[f"model.layers.{i}.mlp.down_proj"]
        attn = xo.var(0, unbiased=True) * layer.self_attn.o_proj.weight.detach().double().pow(2).sum(0)
        mlp = xd.var(0, unbiased=True) * layer.mlp.down_proj.weight.detach().double().pow(2).sum(0)
        out.append((attn**2 if square_attention else attn, mlp, xo.mean(0), xd.mean(0)))
    return out


def gradients(model, ids: torch.Tensor, second_order: bool):
    """Mean-loss gradients of every weight, and (second order) the mean of squared per-sample gradients."""
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.requires_grad_(True)
    work.zero_grad()
    work(ids, labels=ids).loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in work.named_parameters()}
    acc = None
    if second_order:
        acc = {name: torch.zeros_like(p) for name, p in work.named_parameters()}
        for row in ids:
            work.zero_grad()
            work(row[None], labels=row[None]).loss.backward()
            for name, p in work.named_parameters():
                acc[name] += p.grad.detach() ** 2 / len(ids)
    return grads, acc


def taylor_head_groups(model, grads, acc, variant: str, layer: int, kv_groups: bool) -> torch.Tensor:
    """LLM-Pruner group importance of the heads (or kv groups) of one layer, by hand."""
    attn = model.model.layers[layer].self_attn
    d = attn.head_dim
    n_heads = attn.q_proj.out_features // d
    n_kv = attn.k_proj.out_features // d
    prefix = f"model.layers.{layer}.self_attn"

    def sal(name):
        w = getattr(attn, name).weight.detach().double()
        g = grads[f"{prefix}.{name}.weight"].double()
        if variant in ("param_first", "vectorize"):
            return w * g
        second = w * acc[f"{prefix}.{name}.weight"].double() * w
        return second if variant == "param_second" else w * g - 0.5 * second

    def rows(name, units):  # sum over the rows of the given units
        s = sal(name)
        per_row = s.sum(1).abs() if variant == "vectorize" else s.abs().sum(1)
        return sum(float(per_row[u * d : (u + 1) * d].sum()) for u in units)

    def cols(name, units):
        s = sal(name)
        per_col = s.sum(0).abs() if variant == "vectorize" else s.abs().sum(0)
        return sum(float(per_col[u * d : (u + 1) * d].sum()) for u in units)

    if n_kv == n_heads:
        return torch.tensor(
            [rows("q_proj", [h]) + rows("k_proj", [h]) + rows("v_proj", [h]) + cols("o_proj", [h]) for h in range(n_heads)]
        )
    group = n_heads // n_kv
    if kv_groups:
        members = [list(range(j * group, (j + 1) * group)) for j in range(n_kv)]
        return torch.tensor(
            [rows("q_proj", m) + cols("o_proj", m) + rows("k_proj", [j]) + rows("v_proj", [j]) for j, m in enumerate(members)]
        )
    return torch.tensor([rows("q_proj", [h]) + cols("o_proj", [h]) for h in range(n_heads)])


def taylor_channels(model, grads, acc, variant: str, layer: int) -> torch.Tensor:
    mlp = model.model.layers[layer].mlp
    prefix = f"model.layers.{layer}.mlp"
    total = 0
    for name, axis in (("gate_proj", 1), ("up_proj", 1), ("down_proj", 0)):
        w = getattr(mlp, name).weight.detach().double()
        g = grads[f"{prefix}.{name}.weight"].double()
        if variant in ("param_first", "vectorize"):
            s = w * g
        else:
            second = w * acc[f"{prefix}.{name}.weight"].double() * w
            s = second if variant == "param_second" else w * g - 0.5 * second
        total = total + (s.sum(axis).abs() if variant == "vectorize" else s.abs().sum(axis))
    return total
