#!/usr/bin/env bash
# Install llama-cpp-python (a real llama.cpp, CPU only) into the active environment, for the export tests.
# PyPI ships it as source only: the first run builds a wheel (about 9 minutes on 2 cores) into a cache and
# keeps the source distribution beside it, whose convert_hf_to_gguf.py the tests use as an independent check.
# Later runs install the cached wheel in seconds.
set -euo pipefail
VERSION=0.3.36
CACHE="${GISP_CACHE_DIR:-$HOME/.cache/gisp_plugin}/llama-cpp-python-$VERSION"
SDIST="$CACHE/src/llama_cpp_python-$VERSION.tar.gz"
mkdir -p "$CACHE/src"
if [ ! -f "$SDIST" ]; then
    pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/src.partial"
    mv "$CACHE/src.partial/llama_cpp_python-$VERSION.tar.gz" "$SDIST" && rm -rf "$CACHE/src.partial"
fi
if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION for the CPU (once; about 9 minutes on 2 cores)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel --quiet --no-deps -w "$CACHE/build" "$SDIST"
    mv "$CACHE"/build/llama_cpp_python-"$VERSION"-*.whl "$CACHE"/ && rm -rf "$CACHE/build"
fi
pip install --quiet --no-deps "$CACHE"/llama_cpp_python-"$VERSION"-*.whl
pip install --quiet "diskcache>=5.6.1" "jinja2>=2.11.3" sentencepiece
