#!/usr/bin/env bash
# The GPU check (docs/deploy.md): bf16 `gisp prune` on a Llama-2-7B-shaped random model beside `gisp plan`,
# compacted prefill/decode, torchao int4wo/fp8dq quantise-save-reload, FSDP on one NCCL rank; one table.
#   bash benchmarks/gpu_check.sh                      # one CUDA GPU (under 8 minutes on an H200)
#   bash benchmarks/gpu_check.sh --cpu-dry-run        # the same lines on CPU: tiny model, gloo, int8 stand-ins
#   bash benchmarks/gpu_check.sh --json gpu_check.json
# It runs the repository's own code (PYTHONPATH), with the first Python that imports torch and transformers:
# $GISP_PYTHON, then .venv/bin/python (scripts/install.sh), then python3. It installs nothing: a machine without
# a package registry needs torch, transformers, tokenizers, gguf and torchao there already (benchmarks/gpu_check.py
# names whatever is missing in one line and stops).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/baselines${PYTHONPATH:+:$PYTHONPATH}"
tried=()
for candidate in "${GISP_PYTHON:-}" .venv/bin/python python3; do
    [ -n "$candidate" ] || continue
    if ! command -v "$candidate" >/dev/null 2>&1; then
        tried+=("$candidate (not found)")
        continue
    fi
    if "$candidate" -c "import torch, transformers" >/dev/null 2>&1; then
        exec "$candidate" benchmarks/gpu_check.py "$@"
    fi
    tried+=("$candidate (no torch or transformers)")
done
joined=$(printf '%s, ' "${tried[@]}")
echo "gpu_check: no Python here imports torch and transformers (tried ${joined%, }); run 'bash scripts/install.sh' (it needs the package registry) or set GISP_PYTHON" >&2
exit 2
