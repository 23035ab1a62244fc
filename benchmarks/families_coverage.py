"""Which causal-LM families of the installed transformers prune end to end.

For every model type transformers maps to a causal LM: a tiny random model from the family's own config
class (its defaults, with the sizes shrunk: hidden 64, 4 heads of 16 over 2 key/value heads, 32 MLP
channels, 2 layers, 4 experts of 16 channels, top-2), then ``gisp prune --method random`` and
``--method gisp`` at 30 % (a hybrid pruned in its MLPs only: a quarter of what they can give), each pruned
folder reloaded with plain transformers, compared with the dense model under the recorded masks
(compaction equal to masking, logits within 1e-4) and asked to generate.
Prints a table (family, declared or derived, structures found, result or the one-line reason) and
"N of M families prune end to end"; ``--json`` writes the rows.

    python benchmarks/families_coverage.py --json families_coverage.json [--only llama,cohere]

About 25 minutes for every family on 2 shared CPU cores (2026-12-03); ``--only`` runs a few in seconds to minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.tiny: the offline tokenizer and text

from gisp_plugin.adapters.api import adapter_for  # noqa: E402
from gisp_plugin.anatomy.structures import KeepMask  # noqa: E402
from gisp_plugin.cli import main  # noqa: E402
from gisp_plugin.masking.masked_model import MaskedModel  # noqa: E402
from tests.tiny import SAMPLE_TEXT, VOCAB, tiny_tokenizer  # noqa: E402

SIZES = {
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
METHODS = {"random": [], "gisp": ["-o", "steps=2"]}
TOLERANCE = 1e-4
TARGET = 0.3
MAX_PARAMS = 5_000_000  # a family whose defaults stay large at these sizes (extra sub-models) is reported, not built


def causal_lm_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_family_model(model_type: str) -> torch.nn.Module:
    """A random model of ``model_type`` from its own config class, the sizes it has shrunk."""
    config_cls = CONFIG_MAPPING[model_type]
    defaults = config_cls()
    config = config_cls(**{key: value for key, value in SIZES.items() if hasattr(defaults, key)})
    config._attn_implementation = "eager"
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if params > MAX_PARAMS:
        raise ValueError(f"its defaults keep {params / 1e6:.0f}M parameters at these sizes")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a misread one
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def structures(model) -> tuple[str, str]:
    """(declared or derived, the structure kinds of the first layer with their counts) — or raises."""
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    kinds = ", ".join(f"{kind.count} {name}" for name, kind in anatomy.layers[0].kinds.items())
    partial = " (in part: MLPs/experts)" if adapter.declaration is not None and adapter.declaration.attention is None else ""
    return ("derived" if adapter.derived else "declared") + partial, kinds


def target(model) -> float:
    """30 %, or a quarter of what the structures can give in a hybrid pruned in its MLPs only (its mixers stay
    whole; GISP protects the last of the two layers)."""
    anatomy = adapter_for(model).anatomy(model)
    return min(TARGET, round(anatomy.max_sparsity() / 4, 3))


def prune_and_check(folder: Path, text: Path, out: Path, method: str, sparsity: float = 0.3) -> str | None:
    """``gisp prune`` one method, reload, compare with masking, generate: ``None`` or what went wrong."""
    args = ["prune", "--model", str(folder), "--method", method, "--sparsity", str(sparsity), "--out", str(out)]
    args += ["--calibration", f"file:{text}", "--n-samples", "2", "--seqlen", "16", *METHODS[method]]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    if code != 0:
        return f"{method}: {_one_line(stderr.getvalue())}"
    (pruned_folder,) = out.glob(f"{method}-s*")
    record = json.loads((pruned_folder / "pruning.json").read_text())
    pruned = AutoModelForCausalLM.from_pretrained(pruned_folder, trust_remote_code=True).eval()
    dense = AutoModelForCausalLM.from_pretrained(folder).eval()
    anatomy = adapter_for(dense).anatomy(dense)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with MaskedModel(dense, anatomy) as masked, torch.no_grad():
        masked.apply(KeepMask.from_json(anatomy, record["pruned_structures"]))
        reference = dense(ids).logits
        difference = float((pruned(ids).logits - reference).abs().max())
    if not difference <= TOLERANCE * max(1.0, float(reference.abs().max())):
        return f"{method}: the compacted model differs from the masked one by {difference:.2g}"
    generated = pruned.generate(ids[:1], max_new_tokens=4, do_sample=False)
    if generated.shape[1] != ids.shape[1] + 4:
        return f"{method}: generation stopped after {generated.shape[1] - ids.shape[1]} tokens"
    return None


def cover(model_type: str, root: Path, tokenizer, text: Path) -> dict:
    """One table row for ``model_type``."""
    row = {"family": model_type, "anatomy": "", "structures": "", "result": ""}
    started = time.perf_counter()
    try:
        model = tiny_family_model(model_type)
    except Exception as err:  # a family whose defaults do not build at these sizes is reported, not fatal
        row["result"] = f"no tiny model from its config class ({type(err).__name__}: {_one_line(str(err))})"
        return row
    try:
        row["anatomy"], row["structures"] = structures(model)
    except Exception as err:
        row["result"] = _one_line(str(err))
        return row
    folder = root / model_type
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    problems = []
    for method in METHODS:
        try:
            problem = prune_and_check(folder, text, root / f"{model_type}-{method}", method, target(model))
        except Exception as err:
            problem = f"{method}: {type(err).__name__}: {_one_line(str(err))}"
        if problem:
            problems.append(problem)
            break
    row["result"] = problems[0] if problems else "prunes end to end"
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--only", help="comma-separated model types (default: every causal-LM type)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    types = args.only.split(",") if args.only else causal_lm_types()
    tokenizer = tiny_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        text = root / "text.txt"
        text.write_text(SAMPLE_TEXT * 40)
        print("| family | anatomy | structures (layer 0) | result |")
        print("|---|---|---|---|")
        for model_type in types:
            row = cover(model_type, root, tokenizer, text)
            rows.append(row)
            print(f"| {row['family']} | {row['anatomy']} | {row['structures']} | {row['result']} |", flush=True)
    passed = sum(row["result"] == "prunes end to end" for row in rows)
    summary = f"{passed} of {len(rows)} families prune end to end"
    print(summary)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "passed": passed, "families": len(rows), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
