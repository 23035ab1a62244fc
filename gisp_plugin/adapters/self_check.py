"""The proof a derived anatomy gets before any pruning: masking and compaction agree on a small copy.

A declaration read off a family's modules (``adapters.derived``) may misread it: a fused projection laid
out per head rather than ``[q; k; v]``, a norm that does not compute what its shape suggests, a forward
that reads a head count the compacted model does not set. ``self_check`` builds a copy of the family with
a few decoder layers (the model's own config and classes, random weights, norms and biases made
non-trivial), removes a random set of units block by block (attention heads, then MLP or expert channels,
one block emptied), compacts, and compares the compacted model with the masked one on random tokens,
and again token by token through the key/value cache. A difference, or a failure to build or run the
compacted copy, refuses the family in one line naming the block that was not understood, before any
calibration is spent. Passing it once per model is remembered.
"""

from __future__ import annotations

import weakref

import torch
from transformers import PreTrainedModel

from gisp_plugin.adapters.adapter import ArchitectureAdapter, UnsupportedArchitectureError
from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy
from gisp_plugin.compaction.decoder import config_without_layers
from gisp_plugin.masking.masked_model import MaskedModel

CHECK_LAYERS = 2
MAX_CHECK_LAYERS = 8
CHECK_VOCAB = 256
# float32 logits of a random model are O(1); a misread structure moves them by far more than this
TOLERANCE = 1e-4

_PASSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SelfCheckError(UnsupportedArchitectureError):
    """A derived anatomy whose compacted model does not compute what the masked one does."""


def _small_copy(model: PreTrainedModel, adapter: ArchitectureAdapter, seed: int) -> PreTrainedModel:
    """The family's own model with its first ``CHECK_LAYERS`` layers, a small vocabulary and random weights.

    A hybrid whose first layers hold no attention (Qwen3-Next's three linear-attention layers before a full one,
    Jamba's state-space layers) keeps a few more, up to ``MAX_CHECK_LAYERS``, until its own model runs through
    the key/value cache: the check must see the cache path.
    """
    last = min(max(CHECK_LAYERS, MAX_CHECK_LAYERS), model.config.num_hidden_layers)
    for layers in range(min(CHECK_LAYERS, last), last + 1):
        small = _copy_with_layers(model, adapter, seed, layers)
        if layers == last or _runs_with_cache(small):
            return small
    raise AssertionError("unreachable")


def _runs_with_cache(small: PreTrainedModel) -> bool:
    ids = torch.zeros(1, 3, dtype=torch.long)
    try:
        with torch.no_grad():
            prefix = small(ids[:, :-1], use_cache=True)
            small(ids[:, -1:], cache=prefix.cache)
    except (ValueError, RuntimeError, AttributeError):
        return False
    return True


def _copy_with_layers(model: PreTrainedModel, adapter: ArchitectureAdapter, seed: int, layers: int) -> PreTrainedModel:
    config = model.config
    values = config_without_layers(config, list(range(layers)), adapter.declaration)
    vocab = min(values.get("vocab_size") or CHECK_VOCAB, CHECK_VOCAB)
    values["vocab_size"] = vocab
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # token ids of the real vocabulary may not fit
        if isinstance(values.get(key), int) and values[key] >= vocab:
            values[key] = None
        elif isinstance(values.get(key), list):
            values[key] = [token for token in values[key] if token < vocab] or None
    small_config = type(config).from_dict(values)
    small_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    small = type(model)(small_config).float().eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0, which hides a misread norm or bias
        for name, param in small.named_parameters():
            if param.dim() == 1 and ("norm" in name or name.endswith("bias") or param.numel() > 1):
                param.add_(0.1 * torch.randn_like(param))
    return small


def _random_keep(anatomy: ModelAnatomy, blocks: set[str], generator: torch.Generator, empty_first: bool = True) -> KeepMask:
    """Every unit of the given blocks kept with probability 1/2 (at least one removed), the first layer's
    first such block emptied unless ``empty_first`` is false; other blocks whole. Where the units live in
    routed experts, one whole expert of every layer not emptied goes too, so the router runs over fewer experts
    than it was built for, as in a real run (a router that groups its experts fails here, not hours later)."""
    keep = KeepMask.dense(anatomy)
    emptied = not empty_first
    for layer, name in anatomy.units():
        kind = anatomy.kind(layer, name)
        if kind.block not in blocks:
            continue
        flags = torch.rand(kind.count, generator=generator) < 0.5
        flags[int(torch.randint(kind.count, (1,), generator=generator))] = False
        experts = kind.router_rows
        if experts is not None and len(experts.readers) > 1:
            flags[list(experts.readers[int(torch.randint(len(experts.readers), (1,), generator=generator))])] = False
        if not emptied:
            flags[:] = False
            emptied = True
        keep[layer, name] = flags
    return keep


def _difference(small: PreTrainedModel, adapter: ArchitectureAdapter, anatomy: ModelAnatomy, keep: KeepMask, ids) -> str | None:
    """What differs between the masked and the compacted copy (whole sequence, then the cached last step)."""
    with MaskedModel(small, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        reference = small(ids).logits
    with torch.no_grad():
        compact = adapter.compact(small, keep)
        logits = compact(ids).logits
    scale = TOLERANCE * max(1.0, float(reference.abs().max()))
    full = float((logits - reference).abs().max())
    if not full <= scale:
        return f"the compacted logits differ from the masked ones by {full:.2g}"
    if not _runs_with_cache(small):  # the family's own model of these few layers has no cache to compare through
        return None
    with torch.no_grad():
        prefix = compact(ids[:, :-1], use_cache=True)
        step = compact(ids[:, -1:], cache=prefix.cache).logits[:, -1]
    cached = float((step - reference[:, -1]).abs().max())
    if not cached <= scale:
        return f"the compacted logits through the key/value cache differ from the masked ones by {cached:.2g}"
    return None


def self_check(model: PreTrainedModel, adapter: ArchitectureAdapter, seed: int = 0) -> None:
    """Refuse the adapter's anatomy of ``model`` in one line unless masking and compaction agree on a copy."""
    if adapter.declaration is not None and _PASSED.get(model) == adapter.declaration:
        return
    model_type = getattr(model.config, "model_type", type(model).__name__)
    small = _small_copy(model, adapter, seed)
    anatomy = adapter.anatomy(small)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, small.config.vocab_size, (2, 8), generator=generator)
    try:
        with torch.no_grad():
            small(ids)
    except Exception as err:  # the family's own model of these few layers: nothing to compare the compacted one with
        raise SelfCheckError(
            f"model type {model_type!r}: its own model with {small.config.num_hidden_layers} layers does not run "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}), so the check cannot compare"
        ) from None
    blocks = sorted({kind.block for layer in anatomy.layers for kind in layer.kinds.values()})
    for block in blocks:
        kinds = [k for layer in anatomy.layers for k in layer.kinds.values() if k.block == block]
        names = ", ".join(sorted({k.name for k in kinds}))
        # routed experts: once with a layer's experts all gone, once with whole experts gone from every layer
        emptying = (True, False) if any(k.router_rows is not None for k in kinds) else (True,)
        problem = None
        try:
            for empty_first in emptying:
                problem = _difference(small, adapter, anatomy, _random_keep(anatomy, {block}, generator, empty_first), ids)
                if problem is not None:
                    break
        except Exception as err:  # any failure to build or run the masked or compacted copy is what the check reports
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            problem = f"running the masked or the compacted copy failed ({reason})"
        if problem is not None:
            raise SelfCheckError(
                f"model type {model_type!r}: the {names} read off its {block} modules were not understood: {problem} "
                "after removing some; add an adapter plugin for it (docs/families.md)"
            )
    _PASSED[model] = adapter.declaration
