"""Static figures of the Triton NF4 kernels, compiled ahead of time for sm_80/86/89/90 (no GPU needed).

For every config the matmul autotuners may pick (bf16, blocksize 64, double quantization, forward
``x @ W.T`` and input gradient ``g @ W``): shared memory per block against the chip's limit,
registers and spilled bytes per thread, tensor-core instructions, and the main loop's
instruction mix: instructions and integer/select instructions per tensor-core instruction and
per decoded weight element (of one thread: the SASS is one thread's program). Beside each tile, the same figures of a plain bf16 Triton matmul
(both operands loaded from global memory, no decode): what the decode costs on top.

    python benchmarks/kernel_static.py [--archs 89 90] [--out-dir benchmarks/results]

Writes OUT_DIR/kernel_static.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from loralite.kernels import aot  # noqa: E402


@triton.jit
def plain_matmul(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """c = a @ b.T for bf16 a (M, K) and b (N, K): the yardstick tile, no decode."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_R):
        offs_k = k0 + tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None],
                    mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(tl.bfloat16),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def plain_static(launch: aot.Launch, arch: int) -> aot.Static:
    signature = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                 "stride_am": "i32", "stride_bn": "i32", "stride_cm": "i32", "BLOCK_M": "constexpr",
                 "BLOCK_P": "constexpr", "BLOCK_R": "constexpr"}
    tile = {k: launch.constexprs[k] for k in ("BLOCK_M", "BLOCK_P", "BLOCK_R")}
    compiled = aot.compile_kernel(plain_matmul, signature, tile, arch, launch.num_warps, launch.num_stages,
                                  divisible=("a_ptr", "b_ptr", "c_ptr", "N", "K", "stride_am", "stride_bn",
                                             "stride_cm"))
    return aot.inspect(compiled, arch)


def per(value: int, count: int) -> float | str:
    return value / count if count else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, nargs="+", default=list(aot.ARCHS), choices=aot.ARCHS)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for arch in args.archs:
        plain = {}
        for transpose in (False, True):
            for launch in aot.matmul_launches(torch.bfloat16, 64, True, transpose):
                s = aot.inspect(launch.compile(arch), arch)
                c = launch.constexprs
                tile = (c["BLOCK_M"], c["BLOCK_P"], c["BLOCK_R"], launch.num_warps, launch.num_stages)
                if tile not in plain:
                    plain[tile] = plain_static(launch, arch)
                p = plain[tile]
                # weight elements each thread decodes per loop iteration (the SASS is one thread's program)
                decoded = c["BLOCK_P"] * c["BLOCK_R"] / (32 * launch.num_warps)
                rows.append({
                    "arch": f"sm_{arch}", "kernel": launch.name.split("-")[0],
                    "tile MxPxR, split": f"{tile[0]}x{tile[1]}x{tile[2]}, {c['SPLIT_K']}",
                    "warps, stages": f"{tile[3]}, {tile[4]}",
                    "shared KB (limit)": f"{s.shared / 1024:.0f} ({aot.SHARED_LIMIT[arch] / 1024:.0f})",
                    "registers": s.registers, "spill bytes": s.spill_bytes, "MMA in loop": s.loop_mma,
                    "loop instr / MMA": per(s.loop_instructions, s.loop_mma),
                    "plain bf16: loop instr / MMA": per(p.loop_instructions, p.loop_mma),
                    "loop int+select / MMA": per(s.loop_integer, s.loop_mma),
                    "loop instr / decoded weight": s.loop_instructions / decoded,
                    "loop int+select / decoded weight": s.loop_integer / decoded,
                    "16-byte loads": sum(n for op, n in s.loads.items() if op.endswith(".128")),
                    "byte loads": s.loads.get("LDG.E.U8", 0)})
                print(rows[-1], flush=True)
    notes = ("Compiled with Triton's own ptxas for each target, the way `loralite.ops` launches the kernels "
             "(bf16 inputs, blocksize 64, double quantization; pointers and Llama-shaped sizes divisible by 16). "
             "'byte loads' are single-byte global loads: the per-block scale codes of double quantization "
             "(one per weight row and block); the packed codes arrive in 16-byte loads.")
    write_results("kernel_static", rows, meta={"triton": triton.__version__}, notes=notes, folder=args.out_dir)


if __name__ == "__main__":
    main()
