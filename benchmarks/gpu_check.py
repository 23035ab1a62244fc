"""The GPU check: what only a GPU can show, in one table, in under 8 minutes on one H200.

On a random model with Llama-2-7B's published sizes (``LlamaConfig``: 32 layers, hidden 4096, MLP 11008, 32
heads, vocabulary 32000; bfloat16), saved to a temporary folder with a byte-level tokenizer trained offline
(``tests/tiny.py``) and calibrated on a local text file:

- ``prune.*``: ``python -m gisp_plugin prune --method gisp`` (the CLI, in a child process that reports the
  CUDA allocator's peak): median time of a GISP gradient step (from the run's ``trajectory.json``) and the peak
  memory of the whole run, beside ``gisp plan``'s prediction for the same model, dtype and micro-batch;
- ``compact.*``: prefill and decode tokens/s of the dense model, of the folder ``gisp prune --pad-to 64``
  saved (MLP widths padded to multiples of 64) and of the same subnetwork compacted without padding;
- ``quant.int4wo``, ``quant.fp8dq``: torchao quantisation of the saved pruned model
  (``gisp_plugin/deploy/quantize.py``), saved, reloaded with ``load_pruned``, logits compared;
- ``fsdp.*``: ``torchrun --nproc-per-node 1 -m gisp_plugin prune --fsdp`` (the CLI refuses one rank, and the row
  says so), then the nearest honest check: one NCCL rank of ``torchrun`` joins its group, loads the model
  sharded (``load_sharded_model``), scores it with FSDP2 (``run_method``), gathers the compacted model
  (``compact_subnetwork``) and compares the structures it prunes with those of the CLI run.

``--cpu-dry-run`` runs every line except the CUDA calls on CPU: a tiny model of the same structure, float32,
gloo instead of NCCL, and torchao's CPU modes in place of the CUDA-only ones (``int8wo`` for ``int4wo``,
``int8dq`` for ``fp8dq``; the table says so). A row that fails is printed as FAILED with its error and the
command exits 1. Nothing is installed: run it where ``bash scripts/install.sh`` (or an image) put torch,
transformers, tokenizers, gguf and torchao; a missing one is named in one line (exit 2).

    bash benchmarks/gpu_check.sh                     # one CUDA GPU
    bash benchmarks/gpu_check.sh --cpu-dry-run       # CPU, a minute or two
    python benchmarks/gpu_check.py --help
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
MIB = 2**20
NEEDED = ("torch", "transformers", "tokenizers", "safetensors", "pluggy", "peft", "gguf", "torchao")

LLAMA2_7B = dict(  # Llama-2-7B's published sizes (meta-llama/Llama-2-7b-hf config.json)
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_LLAMA = LLAMA2_7B | dict(  # the same structure (plain multi-head attention, untied head), small for CPU
    hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
)

# Every row the check prints, in order: (id, what it is). The test of --cpu-dry-run asserts each one.
ROWS = (
    ("prune.step_time", "gisp prune (CLI): time per GISP gradient step"),
    ("prune.peak_memory", "gisp prune (CLI): peak memory beside gisp plan"),
    ("compact.dense", "prefill / decode: dense"),
    ("compact.padded", "prefill / decode: compacted, --pad-to 64 (as saved)"),
    ("compact.unpadded", "prefill / decode: compacted, unpadded"),
    ("quant.int4wo", "torchao int4wo: quantise, save, reload"),
    ("quant.fp8dq", "torchao fp8dq: quantise, save, reload"),
    ("fsdp.cli_one_rank", "torchrun 1 rank: gisp prune --fsdp"),
    ("fsdp.one_rank", "torchrun 1 rank: FSDP2 scoring + gathered compaction"),
)


@dataclass(frozen=True)
class Setting:
    """What one mode runs: the GPU check, or its CPU dry run."""

    dry_run: bool
    device: str
    dtype: str
    backend: str
    shape: dict[str, Any]
    shape_name: str
    n_samples: int
    seqlen: int
    batch_size: int
    steps: int
    sparsity: float
    pad_to: int
    prefill_batch: int
    prefill_len: int
    decode_tokens: int
    repeats: int
    quants: dict[str, str]  # row quantisation -> what runs (itself on CUDA, a CPU stand-in in the dry run)
    budget_s: float  # what the check should take
    timeout_s: float  # where its children are stopped
    deadline: float = field(default=0.0)  # time.monotonic() of that stop, set by setting()


def setting(dry_run: bool, timeout_s: float | None = None) -> Setting:
    """The GPU check (stopped after 570 s, inside a 10-minute command), or its CPU dry run."""
    common = dict(sparsity=0.2, pad_to=64, batch_size=2)
    if dry_run:
        return Setting(
            dry_run=True,
            device="cpu",
            dtype="float32",
            backend="gloo",
            shape=TINY_LLAMA,
            shape_name="tiny Llama (4 layers, hidden 128, MLP 344, 4 heads)",
            n_samples=4,
            seqlen=32,
            steps=2,
            prefill_batch=2,
            prefill_len=32,
            decode_tokens=4,
            repeats=1,
            quants={"int4wo": "int8wo", "fp8dq": "int8dq"},
            budget_s=240.0,
            timeout_s=timeout_s or 900.0,
            deadline=time.monotonic() + (timeout_s or 900.0),
            **common,
        )
    return Setting(
        dry_run=False,
        device="cuda",
        dtype="bfloat16",
        backend="nccl",
        shape=LLAMA2_7B,
        shape_name="Llama-2-7B shape (32 layers, hidden 4096, MLP 11008, 32 heads), random",
        n_samples=8,
        seqlen=256,
        steps=2,
        prefill_batch=4,
        prefill_len=256,
        decode_tokens=32,
        repeats=3,
        quants={"int4wo": "int4wo", "fp8dq": "fp8dq"},
        budget_s=480.0,
        timeout_s=timeout_s or 570.0,
        deadline=time.monotonic() + (timeout_s or 570.0),
        **common,
    )


@dataclass
class Row:
    id: str
    what: str
    measured: str = ""
    beside: str = ""
    note: str = ""
    ok: bool = True
    values: dict[str, Any] = field(default_factory=dict)


def missing_packages() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def python_env() -> dict[str, str]:
    """The environment of every child: this repository's code first, unbuffered output."""
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "baselines")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(cmd: list[str], log: Path, s: Setting) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, its output appended to ``log``, until the check's deadline: then the
    whole group (torchrun and its rank too) is killed, so a hung child cannot hold the GPU past the check."""
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(cmd)}\n")
        handle.flush()
        child = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=python_env(), start_new_session=True
        )
        timeout = max(s.deadline - time.monotonic(), 1.0)
        try:
            out, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
            handle.write(out)
            raise RuntimeError(f"stopped at the check's time limit ({s.timeout_s:.0f} s): {' '.join(cmd[1:4])} ...") from None
        handle.write(out)
    return subprocess.CompletedProcess(cmd, child.returncode, out)


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def gisp_options(s: Setting) -> list[str]:
    return ["-o", f"steps={s.steps}", "-o", f"batch_size={s.batch_size}"]


def prune_args(s: Setting, model_dir: Path, text: Path, out: Path) -> list[str]:
    """The ``gisp prune`` arguments of the CLI run (and of the refused ``--fsdp`` run)."""
    return [
        "prune",
        "--model",
        str(model_dir),
        "--method",
        "gisp",
        "--sparsity",
        str(s.sparsity),
        *gisp_options(s),
        "--calibration",
        f"file:{text}",
        "--n-samples",
        str(s.n_samples),
        "--seqlen",
        str(s.seqlen),
        "--device",
        s.device,
        "--dtype",
        s.dtype,
        "--pad-to",
        str(s.pad_to),
        "--out",
        str(out),
    ]


def peak_memory(device: str) -> dict[str, int]:
    """This process's peak: the CUDA allocator's (tensors only, and reserved), or the resident set on CPU."""
    import torch

    if device.startswith("cuda"):
        return {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def memory_text(s: Setting, peak: dict[str, int]) -> tuple[int, str]:
    """The peak in bytes and as the table shows it: the CUDA allocator's, or the resident set on CPU."""
    if s.device.startswith("cuda"):
        allocated, reserved = peak["peak_allocated"], peak["peak_reserved"]
        return allocated, f"{allocated / GIB:.1f} GiB allocated ({reserved / GIB:.1f} reserved)"
    return peak["peak_rss"], f"{peak['peak_rss'] / MIB:.0f} MiB resident"


def ratio(s: Setting, measured: int, planned: int) -> str:
    """Measured over planned, on CUDA only (a CPU process's resident set holds Python and its libraries too)."""
    return f" (measured x{measured / planned:.2f})" if s.device.startswith("cuda") else ""


# --- the model -----------------------------------------------------------------------------------------


def build_model(s: Setting, folder: Path) -> dict[str, Any]:
    """A random Llama of the setting's shape, built on the device in its dtype, saved with a tokenizer and text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gisp_plugin.models.loading import parse_dtype
    from tests.tiny import SAMPLE_TEXT, tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**s.shape)
    default = torch.get_default_dtype()
    torch.set_default_dtype(parse_dtype(s.dtype))  # 7B in float32 first would need 27 GB and minutes on CPU
    try:
        with torch.device(s.device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    del model
    if s.device.startswith("cuda"):
        torch.cuda.empty_cache()
    text = folder.parent / "calibration.txt"
    text.write_text(SAMPLE_TEXT * 200)
    return {"params": params, "text": text}


# --- gisp prune and gisp plan --------------------------------------------------------------------------


def plan(s: Setting, model_dir: Path, log: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "gisp_plugin", "plan", "--model", str(model_dir), "--method", "gisp"]
    cmd += ["--dtype", s.dtype, "--seqlen", str(s.seqlen), "--batch-size", str(s.batch_size), "--json"]
    done = run_child(cmd, log, s)
    if done.returncode:
        raise RuntimeError(f"gisp plan exited {done.returncode}: {tail(done.stdout)}")
    return json.loads(done.stdout[done.stdout.index("{") :])


def prune_rows(s: Setting, model_dir: Path, text: Path, work: Path, log: Path, rows: list[Row]) -> Path:
    """The CLI run and ``gisp plan``; its two rows appended, the saved pruned folder returned."""
    predicted = plan(s, model_dir, log)
    out = work / "runs" / "gisp"
    probe = work / "prune_peak.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(probe), "--device", s.device, "--"]
    started = time.perf_counter()
    done = run_child(cmd + prune_args(s, model_dir, text, out), log, s)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"gisp prune exited {done.returncode}: {tail(done.stdout)}")
    trajectory = json.loads((out / "trajectory.json").read_text())
    last: dict[int, float] = {}
    for info in trajectory["steps"]:
        last[info["gradient_step"]] = info["step_time_s"]  # a step's cuts share its gradient; the last has its time
    steps = [last[k] for k in sorted(last)]
    peak = json.loads(probe.read_text())
    folder = out / f"gisp-s{s.sparsity:.2f}"
    setting_note = (
        f"{s.dtype}, {s.n_samples} x {s.seqlen} tokens, micro-batch {s.batch_size}, steps={s.steps}, sparsity {s.sparsity}"
    )
    step_row = Row(
        "prune.step_time",
        dict(ROWS)["prune.step_time"],
        measured=f"{statistics.median(steps):.2f} s/step (median of {len(steps)})",
        beside=f"whole CLI run {wall:.0f} s",
        note=setting_note,
        values={"step_times_s": steps, "cli_wall_s": wall},
    )
    total = predicted["device_total"]
    measured, text_measured = memory_text(s, peak)
    if s.device.startswith("cuda"):
        note = "allocator peak of the whole CLI run (torch.cuda.max_memory_allocated)"
    else:
        note = "CPU: peak resident set of the CLI process (Python and libraries included), not comparable to the plan"
    peak_row = Row(
        "prune.peak_memory",
        dict(ROWS)["prune.peak_memory"],
        measured=text_measured,
        beside=f"plan {total / GIB:.2f} GiB" + ratio(s, measured, total),
        note=note,
        values={"measured_bytes": measured, "plan_bytes": total, "plan": predicted, "probe": peak},
    )
    rows += [step_row, peak_row]
    return folder


# --- compaction and quantisation (in this process) ----------------------------------------------------------


def mlp_widths(model) -> list[int]:
    """The distinct MLP widths of the decoder layers (a layer whose MLP was pruned whole counts 0)."""
    widths = set()
    for layer in model.model.layers:
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        widths.add(down.in_features if down is not None else 0)
    return sorted(widths)


def compaction_and_quant_rows(s: Setting, model_dir: Path, pruned: Path, work: Path) -> list[Row]:
    import torch
    from compaction import measure  # prefill and decode tokens/s, shared with benchmarks/compaction.py

    from gisp_plugin.adapters.api import adapter_for
    from gisp_plugin.checkpoint.saving import PruningRecord, load_pruned, read_record
    from gisp_plugin.checkpoint.trajectory import Trajectory
    from gisp_plugin.methods.api import Subnetwork
    from gisp_plugin.models.loading import load_model
    from gisp_plugin.pruning import compact_subnetwork

    rows: list[Row] = []
    dense, tokenizer = load_model(str(model_dir), s.device, s.dtype)
    trajectory = Trajectory.load(pruned.parent / "trajectory.json", adapter_for(dense).anatomy(dense))
    step = len(trajectory.steps) - 1
    subnetwork = Subnetwork(s.sparsity, trajectory.keep_at(step), trajectory.steps[step]["sparsity"])
    models = {
        "compact.dense": (dense, "the random dense model"),
        "compact.padded": (load_pruned(pruned, s.device, s.dtype), f"the folder gisp prune --pad-to {s.pad_to} saved"),
        "compact.unpadded": (compact_subnetwork(dense, subnetwork, 1)[0], "the same subnetwork, compact_subnetwork(pad_to=1)"),
    }
    bench = argparse.Namespace(batch=s.prefill_batch, seqlen=s.prefill_len, repeats=s.repeats, decode_tokens=s.decode_tokens)
    ids = torch.randint(0, dense.config.vocab_size, (s.prefill_batch, s.prefill_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(s.device)
    logits = {}
    speed = {}
    for row_id, (model, source) in models.items():
        result = measure(model, bench)
        with torch.no_grad():
            logits[row_id] = model(ids, use_cache=False).logits.float()
        speed[row_id] = result
        widths = mlp_widths(model)
        rows.append(
            Row(
                row_id,
                dict(ROWS)[row_id],
                measured=f"prefill {result['tokens_per_s']:.0f} tok/s, decode {result['decode_tokens_per_s']:.1f} tok/s",
                note=f"{source}; MLP widths {widths[0]}..{widths[-1]}; batch {s.prefill_batch} x {s.prefill_len}, "
                f"{s.decode_tokens} new tokens",
                values=result | {"mlp_widths": widths},
            )
        )
    for row in rows:
        ratio_prefill = row.values["tokens_per_s"] / speed["compact.dense"]["tokens_per_s"]
        ratio_decode = row.values["decode_tokens_per_s"] / speed["compact.dense"]["decode_tokens_per_s"]
        row.beside = f"x{ratio_prefill:.2f} / x{ratio_decode:.2f} of dense"
    gap = (logits["compact.padded"] - logits["compact.unpadded"]).abs().max().item()
    rows[1].note += f"; logits off the unpadded by {gap:.2g}"
    rows[1].values["logits_vs_unpadded_max_abs"] = gap
    padded = models["compact.padded"][0]
    del models, dense, model  # only the padded model stays, for quantisation
    rows += quant_rows(s, padded, tokenizer, read_record(pruned), PruningRecord, ids, work)
    return rows


def quant_rows(s: Setting, model, tokenizer, record: dict, record_type, ids, work: Path) -> list[Row]:
    import torch

    from gisp_plugin.checkpoint.saving import load_pruned, save_pruned
    from gisp_plugin.deploy.quantize import check_quantization, quantization_info, quantization_of, quantized_copy
    from gisp_plugin.deploy.size import weights_bytes

    rows = []
    unquantised = weights_bytes(work / "runs" / "gisp" / f"gisp-s{s.sparsity:.2f}")
    for wanted, runs in s.quants.items():
        row_id = f"quant.{wanted}"
        try:
            choice = check_quantization(runs, s.device, s.dtype)
            started = time.perf_counter()
            quantised = quantized_copy(model, choice)
            quantise_s = time.perf_counter() - started
            with torch.no_grad():
                before = quantised(ids, use_cache=False).logits.float()
                noise = (quantised(ids, use_cache=False).logits.float() - before).abs().max().item()  # kernels' own
            saved_record = record_type(**record)
            saved_record.info["quantization"] = quantization_info(choice)
            folder = work / f"quant-{runs}"
            started = time.perf_counter()
            save_pruned(quantised, tokenizer, folder, saved_record)
            save_s = time.perf_counter() - started
            del quantised
            started = time.perf_counter()
            reloaded = load_pruned(folder, s.device, s.dtype)
            reload_s = time.perf_counter() - started
            with torch.no_grad():
                after = reloaded(ids, use_cache=False).logits.float()
            diff = (after - before).abs().max().item()
            kind = quantization_of(reloaded)
            size = weights_bytes(folder)
            del reloaded
            shutil.rmtree(folder, ignore_errors=True)
            stand_in = f"ran {runs}: CPU stand-in for {wanted} (CUDA only); " if runs != wanted else ""
            rows.append(
                Row(
                    row_id,
                    dict(ROWS)[row_id],
                    measured=f"quantise {quantise_s:.1f} s, save {save_s:.1f} s, reload {reload_s:.1f} s; {size / MIB:.0f} MiB",
                    beside=f"reloaded logits off by {diff:.2g} (run to run {noise:.2g}); x{size / unquantised:.2f} in size",
                    note=f"{stand_in}reloaded as {kind}",
                    ok=diff <= noise and kind is not None,  # reloading changes nothing the kernels do not
                    values={
                        "ran": runs,
                        "quantise_s": quantise_s,
                        "save_s": save_s,
                        "reload_s": reload_s,
                        "weights_bytes": size,
                        "unquantised_bytes": unquantised,
                        "reload_logits_max_abs": diff,
                        "run_to_run_logits_max_abs": noise,
                        "reloaded_as": kind,
                    },
                )
            )
        except Exception as err:  # one failed mode still lets the other rows print
            rows.append(failed(row_id, err))
    return rows


# --- FSDP on one rank ------------------------------------------------------------------------------------------


def torchrun(s: Setting) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]


def fsdp_rows(s: Setting, model_dir: Path, text: Path, work: Path, log: Path, rows: list[Row]) -> None:
    """The CLI's ``--fsdp`` on one rank (refused), then FSDP2 on one rank through the library; rows appended."""
    out = work / "runs" / "fsdp-cli"
    done = run_child([*torchrun(s), "-m", "gisp_plugin", *prune_args(s, model_dir, text, out), "--fsdp"], log, s)
    errors = [line.split("error:", 1)[1].strip() for line in done.stdout.splitlines() if line.startswith("gisp prune: error:")]
    child = re.search(r"exitcode\s*:\s*(-?\d+)", done.stdout)  # torchrun itself exits 1 whatever its rank's code
    code = int(child.group(1)) if child else done.returncode
    refused = code == 2 and any("--fsdp" in line for line in errors)
    rows.append(
        Row(
            "fsdp.cli_one_rank",
            dict(ROWS)["fsdp.cli_one_rank"],
            measured=f"refused, rank exit {code}" if refused else f"rank exit {code}",
            beside="as designed: --fsdp needs N >= 2 ranks" if refused else "expected a one-line refusal (exit 2)",
            note=errors[-1] if errors else tail(done.stdout),
            ok=refused,
            values={"rank_exit": code, "torchrun_exit": done.returncode, "message": errors[-1] if errors else None},
        )
    )
    result = work / "fsdp_worker.json"
    cmd = [*torchrun(s), str(Path(__file__).resolve()), "--fsdp-worker", str(result), "--model-dir", str(model_dir)]
    cmd += ["--text", str(text), "--trajectory", str(work / "runs" / "gisp" / "trajectory.json")]
    cmd += ["--cpu-dry-run"] if s.dry_run else []
    done = run_child(cmd, log, s)
    if done.returncode:
        raise RuntimeError(f"the FSDP rank failed (torchrun exit {done.returncode}): {rank_error(done.stdout)}")
    worker = json.loads(result.read_text())
    measured, memory = memory_text(s, worker["peak"])
    differ = worker["structures_differing"]
    planned = worker["plan_bytes"]
    same = (
        "same structures as the CLI run"
        if differ == 0
        else f"{differ} of {worker['structures']} structures differ from the CLI run"
    )
    rows.append(
        Row(
            "fsdp.one_rank",
            dict(ROWS)["fsdp.one_rank"],
            measured=f"{statistics.median(worker['step_times_s']):.2f} s/step, peak {memory}",
            beside=f"{same}; plan of one process without FSDP {planned / GIB:.2f} GiB" + ratio(s, measured, planned),
            note=f"{worker['backend']}, world size {worker['world_size']}, sharded load, gathered compaction "
            f"({worker['compact_params'] / 1e6:.1f} M params); the CLI and gisp plan refuse FSDP on one rank, "
            "so this calls the library",
            ok=worker["compact_params"] > 0,
            values=worker,
        )
    )


def rank_error(output: str) -> str:
    """The rank's own last error line in torchrun's output (``[rank0]: ...Error: ...``), else its last lines."""
    lines = [line.removeprefix("[rank0]:").strip() for line in output.splitlines() if line.startswith("[rank0]:")]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    return errors[-1] if errors else tail(output)


def fsdp_worker(args: argparse.Namespace) -> int:
    """One rank of ``torchrun --nproc-per-node 1``: sharded load, GISP under FSDP2, gathered compaction."""
    import torch
    import torch.distributed as dist

    from gisp_plugin.checkpoint.trajectory import Trajectory
    from gisp_plugin.data.api import CalibrationRequest
    from gisp_plugin.distributed.context import DistributedSetup, backend_for, device_for
    from gisp_plugin.distributed.memory_model import plan_memory
    from gisp_plugin.distributed.sharded_loading import load_sharded_model
    from gisp_plugin.pruning import compact_subnetwork, run_method

    s = setting(args.cpu_dry_run)
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = backend_for(s.device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    try:  # init_distributed refuses fsdp on one rank (the CLI's rule), so the group is joined here
        setup = DistributedSetup(dist.get_world_size(), dist.get_rank(), local_rank, dist.get_backend(), fsdp=True)
        model, tokenizer = load_sharded_model(str(args.model_dir), device_for(setup, s.device), s.dtype, setup)
        options = {"steps": str(s.steps), "batch_size": str(s.batch_size)}
        request = CalibrationRequest(f"file:{args.text}", s.n_samples, s.seqlen, 0)
        trajectory = Trajectory()
        (subnetwork,) = run_method(model, tokenizer, "gisp", [s.sparsity], options, request, 0, None, trajectory)
        compact, params = compact_subnetwork(model, subnetwork, s.pad_to)
        peak = peak_memory(s.device)
        cli = Trajectory.load(args.trajectory)
        cli_keep = cli.keep_at(len(cli.steps) - 1).flags
        differ = sum(int((cli_keep[key] != flags).sum()) for key, flags in subnetwork.keep.flags.items())
        structures = sum(flags.numel() for flags in subnetwork.keep.flags.values())
        last: dict[int, float] = {}
        for info in trajectory.steps:
            last[info["gradient_step"]] = info["step_time_s"]
        planned = plan_memory(str(args.model_dir), 1, False, s.dtype, s.batch_size, s.seqlen)  # refuses fsdp on 1 rank
        result = {
            "world_size": setup.world_size,
            "backend": setup.backend,
            "step_times_s": [last[k] for k in sorted(last)],
            "peak": peak,
            "plan_bytes": planned.device_total,
            "structures": structures,
            "structures_differing": differ,
            "compact_params": params.get("total", 0) if compact is not None else 0,
        }
        Path(args.fsdp_worker).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    return 0


# --- the probe: `python -m gisp_plugin` in a process that reports its peak memory ---------------------------------


def probe(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``python -m gisp_plugin ARGV`` here (``runpy``, exactly as ``-m`` does), then write this process's peak."""
    import runpy

    sys.argv = ["gisp_plugin", *argv]
    code: Any = 0
    try:
        runpy.run_module("gisp_plugin", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code
    finally:
        Path(args.probe).write_text(json.dumps(peak_memory(args.device)))
    return code if isinstance(code, int) else 1


# --- the table ----------------------------------------------------------------------------------------------


def failed(row_id: str, err: BaseException) -> Row:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return Row(row_id, dict(ROWS)[row_id], note=f"{type(err).__name__}: {line}"[:300], ok=False)


def table(rows: list[Row], header: list[str]) -> str:
    cells = [("row", "check", "measured", "beside it", "note")]
    cells += [(r.id, r.what, ("" if r.ok else "FAILED ") + r.measured, r.beside, r.note) for r in rows]
    lines = [*header, "", "| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells[1:]]
    return "\n".join(lines)


def stage(rows: list[Row], prefix: str | tuple[str, ...], log: Path, run: Any) -> None:
    """``run()``; if it raises, its traceback goes to the log and every row of ``prefix`` not yet made is FAILED."""
    try:
        run()
    except Exception as err:
        with log.open("a") as handle:
            handle.write(traceback.format_exc())
        made = {r.id for r in rows}
        rows += [failed(row_id, err) for row_id, _ in ROWS if row_id.startswith(prefix) and row_id not in made]


def check(s: Setting, work: Path) -> tuple[list[Row], dict[str, Any]]:
    import torch

    log = work / "log.txt"
    info: dict[str, Any] = {"log": str(log)}
    if s.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    model_dir = work / "model"
    started = time.perf_counter()
    built = build_model(s, model_dir)
    info["params"] = built["params"]
    info["build_s"] = time.perf_counter() - started
    rows: list[Row] = []
    text = built["text"]
    pruned: list[Path] = []
    stage(rows, "prune.", log, lambda: pruned.append(prune_rows(s, model_dir, text, work, log, rows)))
    if pruned:
        stage(rows, ("compact.", "quant."), log, lambda: rows.extend(compaction_and_quant_rows(s, model_dir, pruned[0], work)))
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()
        stage(rows, "fsdp.", log, lambda: fsdp_rows(s, model_dir, text, work, log, rows))
    else:
        skipped = RuntimeError("skipped: gisp prune failed, so there is no pruned model or trajectory to work on")
        rows += [failed(row_id, skipped) for row_id, _ in ROWS if row_id not in {r.id for r in rows}]
    order = [row_id for row_id, _ in ROWS]
    return sorted(rows, key=lambda r: order.index(r.id)), info


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, rest = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="every line but the CUDA calls, on CPU, tiny model, gloo")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the model, runs and log here (default: a temporary folder)"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=None, help="stop the children after this many seconds (default 570 on GPU, 900 dry)"
    )
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--text", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trajectory", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv), rest


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if args.probe:
        return probe(args, rest)
    if args.fsdp_worker:
        return fsdp_worker(args)
    missing = missing_packages()
    if missing:
        print(
            f"gpu_check: {sys.executable} lacks {', '.join(missing)}; install them first "
            "(bash scripts/install.sh, or offline: pip install --no-index --no-deps WHEEL for each)",
            file=sys.stderr,
        )
        return 2
    import torch

    s = setting(args.cpu_dry_run, args.timeout_s)
    if not s.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU, or give --cpu-dry-run", file=sys.stderr)
        return 2
    from gisp_plugin.deploy.import_noise import quiet_torchao_import

    quiet_torchao_import()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows, info = check(s, work)
        elapsed = time.perf_counter() - started
        over = f" (over the {s.budget_s / 60:.0f}-minute budget)" if elapsed > s.budget_s else ""
        header = [
            f"gpu_check{' --cpu-dry-run' if s.dry_run else ''}: {info.get('gpu', 'CPU')}, {s.device}, {s.dtype}, {s.backend}",
            f"model: {s.shape_name}, {info['params'] / 1e9:.3f} B parameters; total {elapsed:.0f} s{over}",
        ]
        if s.dry_run:
            header.append("dry run: CPU, float32, gloo; int8wo stands in for int4wo and int8dq for fp8dq (CUDA only)")
        print(table(rows, header))
        if any(not r.ok for r in rows):
            print(f"gpu_check: {sum(not r.ok for r in rows)} row(s) failed; the log of every command: {info['log']}")
            if not args.workdir:
                shutil.copy(info["log"], Path.cwd() / "gpu_check.log")
                print("gpu_check: log copied to gpu_check.log")
    if args.json:
        payload = {
            "dry_run": s.dry_run,
            "device": s.device,
            "dtype": s.dtype,
            "backend": s.backend,
            "shape": s.shape,
            "params": info["params"],
            "elapsed_s": elapsed,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
