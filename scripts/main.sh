#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct), from a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh bench
loralite generate --model smollm2-135m --max-new-tokens 48 \
  --prompt "What is the capital of France?" \
  --prompt "Give me one tip for learning to code." \
  --prompt "What is LoRA in machine learning?"
