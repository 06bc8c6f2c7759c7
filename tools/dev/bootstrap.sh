#!/usr/bin/env bash
# Create the project's virtual environment and install ukgpu with everything the
# tests need.  Idempotent; called by `make` (see README's Quick start).
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# CPU build of torch: only the Triton interpreter (kernel tests without a GPU) uses it.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev,kernels,gpu]"
# Compile the CPU kernels now (numba caches the machine code on disk), so that the first
# `ukgpu generate` neither waits 20-40 s nor reports that wait as its speed.
"$VENV/bin/python" -m ukgpu.llama_core.cpu.compile
