#!/usr/bin/env bash
# The fast lane, run first by `make test` (well under a minute): ruff, mypy on the typed layers,
# and the layering and size-budget tests.  Usage: bash tools/dev/lint.sh [BIN_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=$(cd "${1:-.venv/bin}" && pwd)
"$BIN/ruff" check llama_core gpu kernel ptx_kernels tools tests
# mypy resolves `ukgpu.*` imports through a tree of links, since pyproject maps the top-level
# folders onto the ukgpu namespace (build/ is ignored by git).
ns=build/mypy/ukgpu
mkdir -p "$ns"
for d in llama_core gpu kernel ptx_kernels tools; do ln -sfn "../../../$d" "$ns/$d"; done
(cd build/mypy && "$BIN/mypy" --config-file ../../pyproject.toml -p ukgpu.llama_core -p ukgpu.kernel.api)
"$BIN/python" -m pytest -q -p no:cacheprovider tests/unit/test_layering.py tests/unit/test_size_budget.py
