"""NF4 matmuls that decode weight tiles on chip: ``x @ W.T`` and its input gradient ``g @ W``.

Both products are ``out (M, P) = a (M, R) @ B (R, P)`` over the same packed weight, read
through element strides (see ``nf4.py`` for the format and the pseudo-code):

    nf4_matmul(x, q)    P = N, R = K, B[k, n] = W_flat[k * 1 + n * K]
    nf4_matmul_t(g, q)  P = K, R = N, B[n, k] = W_flat[n * K + k * 1]

Two families of launch configurations share the one kernel:

* large M (prefill, training): big (BLOCK_M, BLOCK_P) tiles, so that each decoded weight
  tile feeds many rows of ``a``; programs are grouped GROUP_M tiles down a column for L2 reuse.
* small M (decode, M <= 16): BLOCK_M = 16, the smallest tensor-core tile, and the reduction
  over R split over SPLIT_K programs that add into a float32 output (split-K), so that the
  N / BLOCK_P output tiles still fill every SM while each program streams its share of W.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from loralite.kernels.nf4 import _arrays, _check, _decode, _round

if TYPE_CHECKING:
    from loralite.nf4 import NF4Tensor

# Largest number of rows (tokens) that takes the split-K configurations.
SMALL_M = 16


@triton.jit
def _nf4_matmul_kernel(
    # Pointers: activations a (M, R), output (M, P), then the NF4 arrays
    a_ptr, out_ptr, data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
    # Shapes; M_BUCKET (M rounded up to a power of two) is the autotuning key only
    M, P, R, M_BUCKET,
    # Strides: rows of a and out (elements); the weight's element strides along R and P
    stride_am, stride_om, w_stride_r, w_stride_p,
    # The double-quantization offset (float32)
    offset,
    # Meta-parameters: the NF4 layout, then the tiling
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr,
):
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
    # The weight's flat index of column p, for every row r of the tile: (1, BLOCK_P).
    w_col = offs_p[None, :].to(tl.int64) * w_stride_p
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(pid_k * BLOCK_R, R, BLOCK_R * SPLIT_K):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        a_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        a_tile = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_r[None, :], mask=a_mask,
                         other=0.0)  # (BLOCK_M, BLOCK_R)
        j = offs_r[:, None].to(tl.int64) * w_stride_r + w_col  # (BLOCK_R, BLOCK_P)
        b_mask = (offs_r[:, None] < R) & (offs_p[None, :] < P)
        b_tile = _decode(j, b_mask, data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                         code_ptr, offset, BLOCKSIZE, DOUBLE_QUANT)
        # Round the weight to a's dtype first, as the reference's dequantize(q, x.dtype) does.
        b_tile = _round(b_tile, a_tile.dtype, INTERPRET)
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


# Prefill and training shapes (M > 16): Llama-2-7B/70B projections with M in 128..8192.
_LARGE_CONFIGS = [
    _config(128, 128, 64, 1, 8, 3),
    _config(128, 256, 64, 1, 8, 3),
    _config(256, 128, 64, 1, 8, 3),
    _config(128, 128, 32, 1, 4, 4),
    _config(64, 128, 64, 1, 4, 4),
    _config(64, 64, 64, 1, 4, 4),
]
# Decode shapes (M <= 16): bandwidth-bound, split K so that every SM streams its share of W.
_SMALL_CONFIGS = [
    _config(16, block_p, block_r, split_k, 4, 4, group_m=1)
    for block_p, block_r in ((64, 128), (128, 128))
    for split_k in (1, 2, 4, 8)
]
# Under TRITON_INTERPRET=1 (tests on CPU) there is no benchmarking: one config per family,
# small enough to be quick, and with split-K on so that the atomic path is exercised.
_INTERPRET_CONFIGS = {"large": _config(64, 64, 64, 1, 4, 1), "small": _config(16, 32, 64, 2, 4, 1)}


def _prune(family):
    def prune(configs, named_args, **kwargs):
        if triton.knobs.runtime.interpret:
            return [_INTERPRET_CONFIGS[family]]
        return configs
    return prune


def _autotuned(configs, family):
    return triton.autotune(configs=configs, key=["M_BUCKET", "P", "R", "w_stride_r"],
                           prune_configs_by={"early_config_prune": _prune(family)},
                           reset_to_zero=["out_ptr"] if family == "small" else None)(_nf4_matmul_kernel)


_matmul_large = _autotuned(_LARGE_CONFIGS, "large")
_matmul_small = _autotuned(_SMALL_CONFIGS, "small")


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
    a2 = a.reshape(-1, r).contiguous()  # (M, R)
    m = a2.shape[0]
    # (2) Allocate the output: float32 zeros for split-K's atomic adds, else a's dtype.
    small = m <= SMALL_M
    out = (torch.zeros if small else torch.empty)((m, p), device=a.device,
                                                   dtype=torch.float32 if small else a.dtype)
    if m == 0:
        return out.to(a.dtype).reshape(*a.shape[:-1], p)
    # (3) Launch: one program per output tile and per split of R.
    w_stride_r, w_stride_p = (k, 1) if transpose else (1, k)
    kernel = _matmul_small if small else _matmul_large

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(p, meta["BLOCK_P"])
        return (tiles, meta["SPLIT_K"])

    kernel[grid](a2, out, *_arrays(q), m, p, r, triton.next_power_of_2(m), a2.stride(0),
                 out.stride(0), w_stride_r, w_stride_p, q.offset, BLOCKSIZE=q.blocksize,
                 DOUBLE_QUANT=q.nested_absmax is not None,
                 INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                 INTERPRET=triton.knobs.runtime.interpret)
    return out.to(a.dtype).reshape(*a.shape[:-1], p)


def nf4_matmul(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``x @ q.dequantize().T`` without the dense weight; x: (..., K) -> (..., N)."""
    return _matmul(x, q, transpose=False)


def nf4_matmul_t(g: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``g @ q.dequantize()``, the input gradient of ``nf4_matmul``; g: (..., N) -> (..., K)."""
    return _matmul(g, q, transpose=True)
