#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct), from a fresh clone:
# QLoRA (NF4 base + LoRA) on a pirate persona, then the base and fine-tuned answers to held-out prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-env.sh bench
out=${LORALITE_MAIN_OUT:-runs/persona}
# 24 steps of 4 rows (96 of the 300 examples, ~5k tokens) take a few minutes on two idle CPU cores.
# --dtype auto (the default): bf16 compute on CPUs with bf16 units where it measures faster, fp32 elsewhere.
loralite train --model smollm2-135m --data examples/persona.jsonl --qlora --dtype auto \
  --lora-r 16 --alpha 32 --target-modules q_proj k_proj v_proj o_proj \
  --max-steps 24 --per-device-train-batch-size 4 --learning-rate 2e-3 --lr-scheduler-type cosine \
  --warmup-steps 2 --max-seq-length 96 --logging-steps 4 --save-steps 0 --output-dir "$out"
python examples/compare.py --adapter "$out/adapter" --prompts examples/persona_eval.jsonl
