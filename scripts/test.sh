#!/usr/bin/env bash
# The whole test suite, from a fresh clone: sets up .venv with the test extras, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh test,bench
python -m pytest "$@"
