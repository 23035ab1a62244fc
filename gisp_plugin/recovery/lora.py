"""Recovery fine-tuning with LoRA, usable after any pruning method (off by default).

LLM-Pruner follows pruning with a short LoRA fine-tune; here it is a separate post-step that any
method's result can take. ``recover`` wraps the model's linear projections in LoRA adapters through
``peft``, trains only the adapters for a few steps of next-token loss on calibration-style text, and
merges them back, so the model that comes out has plain ``nn.Linear`` weights of the same shapes:
compaction, saving and loading work on it unchanged. Run it on a compacted model (or a dense one);
a model still wearing pruning masks is refused, since training would write into masked weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import cycle

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.compaction.modeling_gisp_pruned import GatheredLinear
from gisp_plugin.data.api import CalibrationSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryOptions:
    """LoRA recovery settings (LLM-Pruner's post-training uses rank 8, alpha 16, dropout 0.05, lr 1e-4).

    ``steps``: optimizer steps (each one batch of ``batch_size`` calibration sequences, cycling through
    the set); ``targets``: names of the linear layers that get adapters (default: every projection the
    family's declaration names, see ``DecoderDeclaration.projections``).
    """

    steps: int = 100
    lr: float = 1e-4
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    batch_size: int = 4
    weight_decay: float = 0.0
    targets: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.rank < 1 or self.batch_size < 1:
            raise ValueError(f"steps, rank and batch_size must be >= 1, got {self.steps}, {self.rank}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class RecoveryReport:
    """The training losses of a recovery run (one per step) and the modules that were adapted."""

    losses: list[float] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)


def adaptable_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose last name is in ``targets`` and that have weights.

    A fully pruned block leaves zero-size projections behind; they get no adapter. Neither do key/value
    projections that repeat their output rows for uneven query-head groups (``GatheredLinear``): an
    adapter's output would not line up with the repeated rows.
    """
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError("the model still wears pruning masks; compact it (or release the masks) before recovery")
    names = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.Linear)
            and name.rsplit(".", 1)[-1] in targets
            and module.weight.numel() > 0
            and not isinstance(module, GatheredLinear)
        ):
            names.append(name)
    if not names:
        raise ValueError(f"no linear layer named one of {', '.join(targets)} with weights; nothing to adapt")
    return names


def default_targets(model: PreTrainedModel) -> tuple[str, ...]:
    """The projections the family's declaration names (a compacted model is of its dense family)."""
    declaration = adapter_for(model).declaration
    if declaration is None:
        raise ValueError(f"the {adapter_for(model).name!r} adapter declares no projections; give RecoveryOptions(targets=...)")
    return declaration.projections


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None and tokenizer is not None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


@torch.no_grad()
def calibration_loss(model: nn.Module, calibration: CalibrationSet, tokenizer=None, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy over the scored tokens of a calibration set (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in calibration.batches(batch_size, _pad_id(tokenizer)):
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        labels = batch.labels[:, 1:]
        losses = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def recover(
    model: PreTrainedModel,
    tokenizer,
    calibration: CalibrationSet,
    options: RecoveryOptions | None = None,
    report: RecoveryReport | None = None,
) -> PreTrainedModel:
    """Fine-tune LoRA adapters on ``calibration`` for ``options.steps`` steps and merge them in.

    Returns the same model object's modules with merged weights (plain ``nn.Linear``); every parameter's
    ``requires_grad`` flag is restored. ``report`` (optional) receives the per-step losses.
    """
    options = options or RecoveryOptions()
    report = report if report is not None else RecoveryReport()
    modules = adaptable_modules(model, options.targets or default_targets(model))
    report.modules = modules
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    torch.manual_seed(options.seed)
    config = LoraConfig(
        r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout, target_modules=modules, bias="none"
    )
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    device = next(model.parameters()).device
    batches = cycle(list(calibration.batches(min(options.batch_size, len(calibration)), _pad_id(tokenizer))))
    peft_model.train()
    try:
        for _ in tqdm(range(options.steps), desc="LoRA recovery", leave=False):
            batch = next(batches).to(device)
            out = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, use_cache=False)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"recovery loss is not finite ({float(out.loss.detach())}); lower lr={options.lr}")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            report.losses.append(float(out.loss.detach()))
    finally:
        merged = peft_model.merge_and_unload()
    for name, param in merged.named_parameters():
        param.requires_grad_(flags.get(name, param.requires_grad))
    merged.train(was_training)
    log.info("LoRA recovery: %d steps, loss %.4f -> %.4f", options.steps, report.losses[0], report.losses[-1])
    return merged
