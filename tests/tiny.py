"""Tiny random models and a tiny offline tokenizer for tests (built from configs, no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 320
SAMPLE_TEXT = (
    "Structured pruning removes whole attention heads and MLP channels from a language model. "
    "The pruned model is really smaller and faster, and it should keep most of its quality. "
    "Calibration text drives the importance scores; evaluation text must be held apart. "
)

FAMILIES = {
    # plain multi-head attention
    "llama": (LlamaConfig, LlamaForCausalLM, {"num_attention_heads": 4, "num_key_value_heads": 4}),
    # grouped-query attention with a sliding window
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        {"num_attention_heads": 8, "num_key_value_heads": 2, "sliding_window": 16},
    ),
    # q/k/v biases, grouped-query attention
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"num_attention_heads": 6, "num_key_value_heads": 2}),
}


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 3, attn: str = "eager", **overrides):
    """A random model of the given family: hidden 48, head_dim 8, 32 MLP channels, vocab 320."""
    config_cls, model_cls, extra = FAMILIES[family]
    values = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=32,
        num_hidden_layers=layers,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attn_implementation=attn,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    values.update(extra)
    values.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**values)).eval()
    with torch.no_grad():  # random init keeps norms at 1 and biases at 0: make them non-trivial
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with VOCAB tokens, trained offline on SAMPLE_TEXT."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def tiny_folder(root, family: str, tokenizer) -> tuple:
    """A saved tiny ``family`` model with ``tokenizer`` in ``root/tiny-FAMILY``, and a text file of
    SAMPLE_TEXT repeated: what a comparison config needs for its model and its data."""
    model_dir = root / f"tiny-{family}"
    tiny_model(family).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT * 40)
    return model_dir, text


def random_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def random_keep(anatomy, seed: int, p_keep: float, empty_layer: int | None = None, empty_kind: str = "attn_head"):
    """A random KeepMask (each unit kept with probability ``p_keep``), optionally emptying one block."""
    from gisp_plugin.anatomy.structures import KeepMask

    generator = torch.Generator().manual_seed(seed)
    keep = KeepMask.dense(anatomy)
    for key in keep.flags:
        keep[key] = torch.rand(keep[key].shape, generator=generator) < p_keep
    if empty_layer is not None:
        keep[empty_layer, empty_kind] = torch.zeros_like(keep[empty_layer, empty_kind])
    return keep


def record_for(compact, anatomy, keep, target: float = 0.3):
    """A minimal PruningRecord for a compacted tiny model (tests of saving and loading)."""
    from gisp_plugin.checkpoint.saving import PruningRecord, count_params

    return PruningRecord(
        base_model="tiny",
        method="test",
        options={},
        target=target,
        sparsity=anatomy.sparsity(keep),
        params=count_params(compact),
        layers=compact.config.pruned_layers,
        pruned_structures=keep.to_json(),
    )
