"""Parameter accounting of the anatomy against the real tensors."""

import pytest
import torch

from gisp_plugin.adapters.api import UnsupportedArchitectureError, adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from tests.tiny import tiny_model


def test_dense_params_match_real_tensors(tiny):
    anatomy = adapter_for(tiny).anatomy(tiny)
    assert anatomy.dense_params == sum(p.numel() for p in tiny.model.layers.parameters())
    assert anatomy.sparsity(KeepMask.dense(anatomy)) == 0.0


def test_gqa_units_are_query_heads_and_kv_is_dependent():
    model = tiny_model("mistral")  # 8 query heads over 2 kv heads
    kind = adapter_for(model).anatomy(model).kind(0, "attn_head")
    assert kind.count == 8
    assert {s.path for s in kind.owned} == {"self_attn.q_proj.weight", "self_attn.o_proj.weight"}
    assert [d.readers for d in kind.dependents][0] == ((0, 1, 2, 3), (4, 5, 6, 7))
    keep = torch.ones(8, dtype=torch.bool)
    keep[:3] = False  # kv head 0 still read by query head 3
    assert kind.params_kept(keep) == kind.dense_params - 3 * kind.params_per_unit
    keep[3] = False  # now kv head 0 goes too
    kv_params = sum(d.params_per_unit for d in kind.dependents)
    assert kind.params_kept(keep) == kind.dense_params - 4 * kind.params_per_unit - kv_params


def test_mha_heads_own_qkv_rows():
    model = tiny_model("llama")
    kind = adapter_for(model).anatomy(model).kind(0, "attn_head")
    assert kind.dependents == ()
    hidden, head_dim = 48, 8
    assert kind.params_per_unit == 4 * head_dim * hidden


def test_unsupported_family_names_what_is_missing():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    with pytest.raises(UnsupportedArchitectureError, match=r"^model type 'gpt2' .*no decoder layers at model.layers") as err:
        adapter_for(model)
    assert "\n" not in str(err.value)


def test_keep_mask_json_round_trip(tiny):
    anatomy = adapter_for(tiny).anatomy(tiny)
    keep = KeepMask.dense(anatomy)
    keep[1, "mlp_channel"] = torch.arange(32) % 3 == 0
    assert KeepMask.from_json(anatomy, keep.to_json()) == keep
    assert keep.is_subset_of(KeepMask.dense(anatomy))
    assert not KeepMask.dense(anatomy).is_subset_of(keep)
