"""Norms over a whole query/key projection (OLMo 2) under grouped key/value heads.

OLMo 2's ``q_norm`` and ``k_norm`` normalise the whole projection, not each head: a kept head owns its slice of
the norm's weight, and the masked model's norm takes its mean over the dense width with the removed heads' rows
at zero. Under uneven groups the compacted model gives each query head its own copy of its key head; the copies
must be made after the key norm, or the norm would count a shared key head once per reader. Tiny models from
the family's config class with the fields of allenai/OLMo-2-0325-32B (40 query heads over 8 key/value heads).
"""

from __future__ import annotations

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.adapters.self_check import self_check
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.compaction.modeling_gisp_pruned import GatheredLinear
from gisp_plugin.export.native import saved_form
from tests.compaction_check import compact_equal_to_masked
from tests.tiny import random_keep, tiny_model

GQA = {"num_key_value_heads": 2}  # 6 query heads over 2 key/value heads, as OLMo-2-0325-32B groups 40 over 8


def test_uneven_groups_under_a_whole_projection_key_norm_equal_masking():
    """Heads 0, 1 kept of the first group, head 3 of the second: the key rows are repeated after the key norm."""
    model = tiny_model("olmo2", **GQA)
    anatomy = adapter_for(model).anatomy(model)
    keep = KeepMask.dense(anatomy)
    for layer in range(3):
        flags = torch.zeros(6, dtype=torch.bool)
        flags[[0, 1, 3] if layer != 1 else [5]] = True
        keep[layer, "attn_head"] = flags
    compact = compact_equal_to_masked(model, keep)
    attn = compact.model.layers[0].self_attn
    assert not isinstance(attn.k_proj, GatheredLinear) and isinstance(attn.v_proj, GatheredLinear)
    assert attn.k_norm.gather is not None and attn.k_norm.weight.shape == (16,)  # both key heads, once each
    # what `gisp prune` saves: the pruned form, saying why (the family's own norm cannot repeat key rows)
    same, form = saved_form(compact)
    assert same is compact and form["form"] == "gisp-pruned" and "repeats key rows" in form["why"]


@pytest.mark.parametrize("seed", range(4))
def test_random_masks_under_grouped_whole_projection_norms_equal_masking(seed):
    model = tiny_model("olmo2", **GQA)
    anatomy = adapter_for(model).anatomy(model)
    compact_equal_to_masked(model, random_keep(anatomy, seed, 0.5, empty_layer=seed % 3), seed)


def test_the_self_check_passes_on_grouped_whole_projection_norms():
    for seed in range(3):  # random removals, uneven groups among them (a model passes once: a new one each time)
        model = tiny_model("olmo2", seed=seed, **GQA)
        self_check(model, adapter_for(model), seed=seed)
