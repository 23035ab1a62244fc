"""An example adapter plugin: the ``renamed`` family, a Llama whose every module has another name.

The family is registered with transformers (``AutoConfig`` / ``AutoModelForCausalLM``) when this package is
imported; its attention lives at ``mixer`` with projections ``wq``/``wk``/``wv``/``wo`` and its MLP at
``ffn`` with ``w_gate``/``w_in``/``w_out``, names nothing in gisp-plugin knows (the derived adapter refuses
them). One ``DecoderDeclaration`` is all the plugin writes: every method, compaction, LoRA recovery,
onloading and sharded compaction then follow from it.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama import modeling_llama

from gisp_plugin.adapters.adapter import ArchitectureAdapter, decoder_adapter
from gisp_plugin.anatomy.decoder import AttentionNames, DecoderDeclaration, MLPNames
from gisp_plugin.plugins import hookimpl

MODEL_TYPE = "renamed"
# module renames: the Llama name -> this family's name
ATTENTION = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
MLP = {"gate_proj": "w_gate", "up_proj": "w_in", "down_proj": "w_out"}


def _renamed(base: type, names: dict[str, str]) -> type:
    """``base`` with its submodules stored under other names (the Llama forward reaches them by aliases)."""

    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        for old, new in names.items():
            self._modules[new] = self._modules.pop(old)

    aliases = {old: property(lambda self, new=new: self._modules[new]) for old, new in names.items()}
    return type(f"Renamed{base.__name__}", (base,), {"__init__": __init__, **aliases})


RenamedAttention = _renamed(modeling_llama.LlamaAttention, ATTENTION)
RenamedMLP = _renamed(modeling_llama.LlamaMLP, MLP)


class RenamedDecoderLayer(modeling_llama.LlamaDecoderLayer):
    """A Llama layer whose attention is ``mixer`` and whose MLP is ``ffn``."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.self_attn, self.mlp
        self.mixer = RenamedAttention(config=config, layer_idx=layer_idx)
        self.ffn = RenamedMLP(config)

    @property
    def self_attn(self):
        return self.mixer

    @property
    def mlp(self):
        return self.ffn


class RenamedConfig(LlamaConfig):
    model_type = MODEL_TYPE


class RenamedModel(LlamaModel):
    config_class = RenamedConfig

    def __init__(self, config):
        super().__init__(config)
        self.layers = type(self.layers)(RenamedDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


class RenamedForCausalLM(LlamaForCausalLM):
    config_class = RenamedConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = RenamedModel(config)
        self.post_init()


AutoConfig.register(MODEL_TYPE, RenamedConfig)
AutoModelForCausalLM.register(RenamedConfig, RenamedForCausalLM)

DECLARATION = DecoderDeclaration(
    AttentionNames(module="mixer", q="wq", k="wk", v="wv", o="wo"),
    MLPNames(module="ffn", gate="w_gate", up="w_in", down="w_out"),
)
ADAPTER = decoder_adapter("renamed", "Example plugin: a Llama with renamed modules", (MODEL_TYPE,), DECLARATION)


@hookimpl
def gisp_adapters() -> list[ArchitectureAdapter]:
    return [ADAPTER]
