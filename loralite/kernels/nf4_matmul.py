"""NF4 matmuls that decode weight tiles on chip: ``x @ W.T`` and its input gradient ``g @ W``.

Both products are ``out (M, P) = a (M, R) @ B (R, P)`` over the same packed weight W (N, K):

    nf4_matmul(x, q)    P = N, R = K, B = W.T: each step decodes W[p tile, r0 : r0 + BLOCK_R], transposed
    nf4_matmul_t(g, q)  P = K, R = N, B = W:   each step decodes W[r0 : r0 + BLOCK_R, p tile]

Either way a step decodes a tile of whole rows segments of W (``_decode_rows``): each row's
codes are contiguous bytes, read with 16-byte vector loads; nibbles are split and looked up in
registers (``_lookup``), and each row segment's block scales are decoded once. This needs rows of
whole quantization blocks (K % blocksize == 0, true of every Llama projection); other weights
(``fuses(q)`` False) are dequantized by ``nf4_dequantize`` and multiplied by torch.

Two families of launch configurations share the one kernel:

* large M (prefill, training): big (BLOCK_M, BLOCK_P) tiles, so that each decoded weight
  tile feeds many rows of ``a``; programs are grouped GROUP_M tiles down a column for L2 reuse.
* small M (decode, M <= 16): BLOCK_M = 16, the smallest tensor-core tile, and the reduction
  over R split over SPLIT_K programs that add into a float32 output (split-K), so that the
  N / BLOCK_P output tiles still fill every SM while each program streams its share of W.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from loralite.kernels.nf4 import _arrays, _block_scales, _check, _lookup, _round, _unpack, nf4_dequantize

if TYPE_CHECKING:
    from loralite.nf4 import NF4Tensor

# Largest number of rows (tokens) that takes the split-K configurations.
SMALL_M = 16


@triton.jit
def _decode_rows(
    rows, k0,  # (BLOCK_ROWS,) row indices of W; the first column of the tile (a multiple of BLOCK_K)
    N, K,  # W's shape (out, in); K % BLOCKSIZE == 0, so every row holds whole quantization blocks
    row_bytes,  # K // 2, passed apart so that the JIT sees its divisibility by 16 (16-byte loads)
    # Pointers to the NF4 arrays, and the double-quantization offset
    data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
    BLOCK_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SCALES: tl.constexpr,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
):
    """Float32 ``W[rows, k0 : k0 + BLOCK_K]``, (BLOCK_ROWS, BLOCK_K), 0 outside W.

    Row r's codes are the K / 2 bytes from ``data[r * K / 2]``: the tile reads BLOCK_K / 2
    contiguous bytes per row (vector loads), splits the nibbles in registers, looks their values up
    in registers, and scales them by SCALES = max(BLOCK_K / BLOCKSIZE, 1) block scales per row.
    """
    row_ok = rows < N
    byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(data_ptr + rows[:, None].to(tl.int64) * row_bytes + byte[None, :],
                     mask=row_ok[:, None] & (byte[None, :] < row_bytes), other=0)  # (BLOCK_ROWS, BLOCK_K / 2)
    values = _lookup(_unpack(packed, BLOCK_ROWS, BLOCK_K), code_ptr)  # (BLOCK_ROWS, BLOCK_K)
    blocks_per_row = K // BLOCKSIZE
    column_block = k0 // BLOCKSIZE + tl.arange(0, SCALES)
    scale = _block_scales(rows[:, None].to(tl.int64) * blocks_per_row + column_block[None, :],
                          row_ok[:, None] & (column_block[None, :] < blocks_per_row), absmax_ptr,
                          nested_absmax_ptr, nested_code_ptr, offset, DOUBLE_QUANT)  # (BLOCK_ROWS, SCALES)
    values = tl.reshape(values, (BLOCK_ROWS, SCALES, BLOCK_K // SCALES)) * scale[:, :, None]
    return tl.reshape(values, (BLOCK_ROWS, BLOCK_K))


@triton.jit
def _nf4_matmul_kernel(
    # Pointers: activations a (M, R), output (M, P), then the NF4 arrays
    a_ptr, out_ptr, data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
    # Shapes: a's rows, the weight's (out, in) and bytes per row; M_BUCKET (M rounded up to a power of
    # two) is the autotuning key only
    M, N, K, row_bytes, M_BUCKET,
    # Strides of the rows of a and out (elements), and the double-quantization offset (float32)
    stride_am, stride_om, offset,
    # Meta-parameters: the NF4 layout and the product, then the tiling
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TRANSPOSE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out (M, P) = a (M, R) @ B (R, P): B = W.T (R = K, P = N), or with TRANSPOSE B = W (R = N, P = K)."""
    if TRANSPOSE:
        P, R = K, N
    else:
        P, R = N, K
    # Map the program id to its output tile, GROUP_M tiles down a column at a time.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    num_pid_in_group = GROUP_M * num_pid_p
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_p = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(pid_k * BLOCK_R, R, BLOCK_R * SPLIT_K):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        a_tile = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_r[None, :],
                         mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)  # (BLOCK_M, BLOCK_R)
        if TRANSPOSE:  # B = W[r0 : r0 + BLOCK_R, p tile]: rows of W along the reduction
            b_tile = _decode_rows(offs_r, pid_p * BLOCK_P, N, K, row_bytes, data_ptr, absmax_ptr,
                                  nested_absmax_ptr, nested_code_ptr, code_ptr, offset, BLOCK_R, BLOCK_P,
                                  max(BLOCK_P // BLOCKSIZE, 1), BLOCKSIZE, DOUBLE_QUANT)
        else:  # B = W[p tile, r0 : r0 + BLOCK_R].T
            b_tile = tl.trans(_decode_rows(offs_p, r0, N, K, row_bytes, data_ptr, absmax_ptr,
                                           nested_absmax_ptr, nested_code_ptr, code_ptr, offset, BLOCK_P,
                                           BLOCK_R, max(BLOCK_R // BLOCKSIZE, 1), BLOCKSIZE, DOUBLE_QUANT))
        # Round the weight to a's dtype first, as the reference's dequantize(q, x.dtype) does.
        b_tile = _round(b_tile, a_tile.dtype, INTERPRET)  # (BLOCK_R, BLOCK_P)
        if INTERPRET:  # the interpreter's dot multiplies bfloat16 as raw integers; fp32 is exact here
            acc = tl.dot(a_tile.to(tl.float32), b_tile.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a_tile, b_tile, acc, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_p[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_p[None, :] < P)
    if SPLIT_K == 1:
        tl.store(out_ptrs, _round(acc, out_ptr.dtype.element_ty, INTERPRET), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


def _config(block_m, block_p, block_r, split_k, warps, stages, group_m=8):
    meta = dict(BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=block_r, SPLIT_K=split_k, GROUP_M=group_m)
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Every config below compiles for sm_80, sm_86, sm_89 and sm_90 within the chip's shared memory
# (at most ~92 KB of the 99 KB of sm_86/89) and without spilling registers: tests/test_kernels_aot.py
# checks it, benchmarks/results/kernel_static.md lists the figures. Larger tiles (128 x 256, 256 x 128,
# 16 x 128 x 128 for decode; 128 x 64 on sm_90) spill: the decoded tile and the accumulator outgrow
# 255 registers a thread.
# Prefill and training shapes (M > 16, up to ops.FUSED_MAX_ROWS; above it cuBLAS takes the product).
LARGE_CONFIGS = [
    _config(128, 128, 64, 1, 8, 3),
    _config(64, 128, 64, 1, 4, 4),
    _config(64, 256, 64, 1, 8, 3),
    _config(64, 64, 64, 1, 4, 4),
]
# Decode shapes (M <= 16): bandwidth-bound, split K so that every SM streams its share of W.
SMALL_CONFIGS = [
    _config(16, block_p, block_r, split_k, 4, 4, group_m=1)
    for block_p, block_r in ((64, 128), (64, 64))
    for split_k in (1, 2, 4, 8)
]
# Under TRITON_INTERPRET=1 (tests on CPU) there is no benchmarking: one config per family,
# small enough to be quick, and with split-K on so that the atomic path is exercised.
_INTERPRET_CONFIGS = {"large": _config(64, 64, 64, 1, 4, 1), "small": _config(16, 32, 64, 2, 4, 1)}


def _prune(family):
    def prune(configs, named_args, **kwargs):
        if triton.knobs.runtime.interpret:
            return [_INTERPRET_CONFIGS[family]]
        if os.environ.get("LORALITE_AUTOTUNE") == "0":  # correctness runs (the GPU tests): the first config
            return configs[:1]
        return configs
    return prune


def _autotuned(configs, family):
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "TRANSPOSE"],
                           prune_configs_by={"early_config_prune": _prune(family)},
                           reset_to_zero=["out_ptr"] if family == "small" else None)(_nf4_matmul_kernel)


_matmul_large = _autotuned(LARGE_CONFIGS, "large")
_matmul_small = _autotuned(SMALL_CONFIGS, "small")


def fuses(q: NF4Tensor) -> bool:
    """Whether the fused kernel takes ``q``: its rows hold whole quantization blocks (and so whole bytes)."""
    return q.rows_hold_whole_blocks


def _matmul(a: torch.Tensor, q: NF4Tensor, transpose: bool) -> torch.Tensor:
    """``a @ W.T`` (transpose=False) or ``a @ W`` (transpose=True) for the NF4 weight W (N, K)."""
    # (1) Check shapes and devices.
    _check(q, a.device)
    n, k = q.shape
    r, p = (n, k) if transpose else (k, n)
    if a.shape[-1] != r:
        raise ValueError(f"input has {a.shape[-1]} features in its last dimension but the NF4 "
                         f"weight of shape {tuple(q.shape)} needs {r}")
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"NF4 matmul takes float16, bfloat16 or float32 inputs, not {a.dtype}")
    if not fuses(q):  # blocks span rows: the tile decode needs whole blocks per row
        return a @ (nf4_dequantize(q, a.dtype) if transpose else nf4_dequantize(q, a.dtype).T)
    a2 = a.reshape(-1, r).contiguous()  # (M, R)
    m = a2.shape[0]
    # (2) Allocate the output: float32 zeros for split-K's atomic adds, else a's dtype.
    small = m <= SMALL_M
    out = (torch.zeros if small else torch.empty)((m, p), device=a.device,
                                                   dtype=torch.float32 if small else a.dtype)
    if m == 0:
        return out.to(a.dtype).reshape(*a.shape[:-1], p)
    # (3) Launch: one program per output tile and per split of R.
    kernel = _matmul_small if small else _matmul_large

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"])
        return (tiles, meta["SPLIT_K"])

    # No fused multiply-add: the block scales round as the reference's do (W is bit-identical).
    kernel[grid](a2, out, *_arrays(q), m, n, k, k // 2, triton.next_power_of_2(m), a2.stride(0), out.stride(0),
                 q.offset, BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.nested_absmax is not None, TRANSPOSE=transpose,
                 INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                 INTERPRET=triton.knobs.runtime.interpret, enable_fp_fusion=False)
    return out.to(a.dtype).reshape(*a.shape[:-1], p)


def nf4_matmul(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``x @ q.dequantize().T`` without the dense weight; x: (..., K) -> (..., N)."""
    return _matmul(x, q, transpose=False)


def nf4_matmul_t(g: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``g @ q.dequantize()``, the input gradient of ``nf4_matmul``; g: (..., N) -> (..., K)."""
    return _matmul(g, q, transpose=True)
