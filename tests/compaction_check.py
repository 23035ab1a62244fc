"""Compacted equals masked: the check the family tests share."""

from __future__ import annotations

import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.masking.masked_model import MaskedModel
from tests.tiny import random_ids


def compact_equal_to_masked(model, keep: KeepMask, seed: int = 0):
    """Compact ``model`` to ``keep`` and check its logits, one step through the key/value cache and greedy
    generation against the masked model's (float32: 1e-5); returns the compacted model."""
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    ids = random_ids(2, 10, seed)
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        expected = model(ids).logits
        expected_tokens = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    compact = adapter.compact(model, keep)
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, expected, rtol=1e-5, atol=1e-5)
        prefix = compact(ids[:, :-1], use_cache=True)
        step = compact(ids[:, -1:], cache=prefix.cache).logits[:, -1]
        torch.testing.assert_close(step, expected[:, -1], rtol=1e-5, atol=1e-5)
        assert torch.equal(compact.generate(ids[:1], max_new_tokens=5, do_sample=False), expected_tokens)
    return compact
