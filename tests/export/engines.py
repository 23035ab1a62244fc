"""Running exported files in a real engine: llama.cpp through llama-cpp-python, and llama.cpp's own converter.

``scripts/llama_cpp.sh`` (run by ``scripts/install.sh --test``) builds llama-cpp-python from PyPI's source
distribution once per machine and keeps that source distribution in the cache; its ``convert_hf_to_gguf.py``
is llama.cpp's own converter, an independent reader of the folders we write. In CI both must be there: a
missing engine fails the tests instead of skipping them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

LLAMA_CPP_VERSION = "0.3.36"
SOURCE = f"llama_cpp_python-{LLAMA_CPP_VERSION}"


def llama_cpp():
    """The llama_cpp module (skipped outside CI when it is not installed, an error in CI)."""
    if os.environ.get("CI"):
        import llama_cpp as module

        return module
    return pytest.importorskip("llama_cpp", reason="bash scripts/llama_cpp.sh installs llama.cpp for these tests")


def load(path: Path, n_ctx: int = 64):
    """A llama.cpp model with float32 key/value cache (f16 by default) and every position's logits kept."""
    module = llama_cpp()
    f32 = module.GGML_TYPE_F32
    return module.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, type_k=f32, type_v=f32, n_threads=2, seed=0)


def logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(ids), vocab]`` for one sequence of token ids."""
    model = load(path)
    model.eval(ids)
    out = np.array(model.scores[: len(ids)], dtype=np.float32)
    model.close()
    return out


def greedy(path: Path, ids: list[int], steps: int) -> list[int]:
    """Greedy continuation by llama.cpp, one token at a time through its key/value cache."""
    model = load(path)
    model.eval(ids)
    out = []
    for _ in range(steps):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        out.append(token)
        model.eval([token])
    model.close()
    return out


def tokenize(path: Path, text: str) -> list[int]:
    model = load(path)
    out = model.tokenize(text.encode(), add_bos=False, special=False)
    model.close()
    return out


def source_distribution() -> Path:
    """The cached llama-cpp-python source distribution (``scripts/llama_cpp.sh`` keeps it)."""
    cache = Path(os.environ.get("GISP_CACHE_DIR", Path.home() / ".cache" / "gisp_plugin"))
    sdist = cache / f"llama-cpp-python-{LLAMA_CPP_VERSION}" / "src" / f"{SOURCE}.tar.gz"
    if not sdist.exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{sdist} is missing: scripts/llama_cpp.sh keeps it")
        pytest.skip("bash scripts/llama_cpp.sh keeps llama.cpp's source (and its converter) in the cache")
    return sdist


def extract_converter(root: Path) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion`` package and gguf-py, unpacked under ``root``."""
    base = f"{SOURCE}/vendor/llama.cpp"
    wanted = (f"{base}/convert_hf_to_gguf.py", f"{base}/conversion/", f"{base}/gguf-py/")
    with tarfile.open(source_distribution()) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(wanted)]
        archive.extractall(root, members=members, filter="data")
    return root / base


def convert(converter: Path, folder: Path, out: Path) -> subprocess.CompletedProcess:
    """Run llama.cpp's own converter on a Hugging Face folder (float32 output)."""
    env = {**os.environ, "PYTHONPATH": str(converter / "gguf-py")}
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out), "--outtype", "f32"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
