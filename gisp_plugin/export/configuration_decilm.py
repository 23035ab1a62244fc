"""Config class of a Nemotron-NAS (DeciLM) folder written by ``gisp export --format nemotron-nas``.

Copied beside the folder's ``config.json`` (``auto_map``), so an engine that reads the config through
transformers with ``trust_remote_code`` (vLLM, SGLang) gets ``block_configs`` as objects with the attributes
it reads (``attention.n_heads_in_group``, ``attention.no_op``, ``ffn.ffn_mult``, ``ffn.no_op``). Everything
else is Llama's config. It depends only on transformers.
"""

from __future__ import annotations

from types import SimpleNamespace

from transformers import LlamaConfig


def _block(config: dict | SimpleNamespace) -> SimpleNamespace:
    if isinstance(config, SimpleNamespace):
        return config
    return SimpleNamespace(attention=SimpleNamespace(**config["attention"]), ffn=SimpleNamespace(**config["ffn"]))


def _as_dict(block: SimpleNamespace) -> dict:
    return {"attention": dict(vars(block.attention)), "ffn": dict(vars(block.ffn))}


class DeciLMConfig(LlamaConfig):
    """Llama's config plus one ``block_configs`` entry per layer (head groups, MLP multiplier, no-op blocks)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list | None = None, **kwargs):
        self.block_configs = [_block(block) for block in block_configs or []]
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        values = super().to_dict()
        values["block_configs"] = [_as_dict(block) for block in self.block_configs]
        return values
