#!/usr/bin/env bash
# The GPU checks of loralite in one run (at most 9 minutes of time limits on one H200 or RTX 4090):
#   1. build loralite._C with its CUDA GEMV (pip install --no-build-isolation --no-deps -e .),
#   2. run the kernel tests on the GPU (Triton compiled, the CUDA GEMV run),
#   3. run benchmarks/nf4_kernels.py, then benchmarks/qlora_step.py at the 7B and 13B shapes.
# It needs only torch, triton, transformers and peft (no package index, no model files: the
# benchmarks use random weights; loralite imports gguf only to read a GGUF file); a peer that is
# not installed (bitsandbytes) is reported as absent. Each step is time-limited and its results
# are copied into OUTDIR as soon as it ends.
# Usage: benchmarks/gpu_suite.sh OUTDIR   (logs, JSON and Markdown are written into OUTDIR)
set -uo pipefail
OUTDIR=$(mkdir -p "${1:?usage: benchmarks/gpu_suite.sh OUTDIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logging to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUTDIR/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

step build 120 "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
step extension 30 "$PYTHON" -c "import torch; from loralite import ops; \
assert ops.HAS_EXTENSION and hasattr(torch.ops.loralite, 'nf4_gemv'), 'loralite._C was built without CUDA'; \
print('loralite._C with the CUDA GEMV, on', torch.cuda.get_device_name())"
# one config per autotuner (LORALITE_AUTOTUNE=0): the tests check numbers, the benchmarks tune
step tests 75 env LORALITE_AUTOTUNE=0 "$PYTHON" -m pytest tests/test_kernels.py tests/test_csrc.py tests/test_ops.py -q -x
# NF4 GEMV (M = 1, 16) and GEMM forward + backward (M = 128 .. 8192) against cuBLAS bf16 and bitsandbytes
step nf4_kernels 100 "$PYTHON" benchmarks/nf4_kernels.py --out-dir "$OUTDIR"
# a 7B-shaped QLoRA step and decode against transformers + PEFT + bitsandbytes, and a 13B step alone,
# both under a 24 GB cap, each peak beside estimate_memory
step qlora_7b 140 "$PYTHON" benchmarks/qlora_step.py --device cuda --shape llama-2-7b --seq 512 --cap-gb 24 \
    --out-dir "$OUTDIR"
step qlora_13b 75 "$PYTHON" benchmarks/qlora_step.py --device cuda --shape llama-2-13b --seq 512 --cap-gb 24 \
    --no-peer --quick --out-dir "$OUTDIR"
exit $status
