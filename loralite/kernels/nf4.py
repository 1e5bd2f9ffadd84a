"""Triton kernels for NF4 weights: dequantize, and matmuls that decode tiles on chip.

An NF4 weight ``W`` of shape (N, K) = (out_features, in_features) is stored as five
small arrays (see ``loralite.nf4.NF4Tensor``). Element ``j`` of the row-major
flattened weight is

    nibble_j = data[j // 2] >> 4        if j is even   (first element: high nibble)
               data[j // 2] & 0xF       if j is odd
    scale_b  = absmax[b]                                               (plain)
             = nested_code[absmax[b]] * nested_absmax[b // 256] + offset  (double quant)
    W_j      = code[nibble_j] * scale_(j // blocksize)                 (float32)

Decoding happens in registers, one tile at a time, so a matmul reads 0.5 byte per weight
element (plus 1/blocksize of a byte of scale codes) instead of the 2 bytes of a bf16 copy.

One kernel serves both products an ``nn.Linear`` needs:

    forward   y  = x @ W.T   (M, N) = (M, K) @ (K, N),  B[k, n] = W[n, k]
    backward  dx = g @ W     (M, K) = (M, N) @ (N, K),  B[n, k] = W[n, k]

Both are ``out (M, P) = a (M, R) @ B (R, P)`` with ``B[r, p] = W_flat[r * w_stride_r +
p * w_stride_p]``: the forward walks the weight with strides (1, K), the backward with
(K, 1). In pseudo-code, each program computes one (BLOCK_M, BLOCK_P) tile of ``out``::

    acc = zeros((BLOCK_M, BLOCK_P), float32)
    for r0 in range(pid_k * BLOCK_R, R, BLOCK_R * SPLIT_K):   # this program's share of R
        a_tile = a[m_tile, r0 : r0 + BLOCK_R]                   # (BLOCK_M, BLOCK_R)
        b_tile = decode(W_flat[r * w_stride_r + p * w_stride_p])  # (BLOCK_R, BLOCK_P)
        acc += a_tile @ b_tile
    out[m_tile, p_tile] (+)= acc

For small M (decode, M <= 16) the matmul is bandwidth-bound and there are too few output
tiles to fill the GPU, so the reduction over R is also split over SPLIT_K programs that
add their partial sums into a float32 output with atomics (split-K).
This file holds the decode step and ``nf4_dequantize``; ``nf4_matmul.py`` the matmuls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from loralite.nf4 import NF4Tensor

# Absmax values are themselves quantized in groups of this many (bitsandbytes' fixed size).
NESTED_BLOCKSIZE = tl.constexpr(256)


@triton.jit
def _decode(
    j,  # flat element indices (int64), any shape
    mask,  # which of them are inside the weight
    # Pointers to the NF4 arrays
    data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
    offset,  # mean of the absmaxes (float32), added back after the nested decode
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
):
    """Float32 values of the NF4 elements at flat indices ``j`` (0 where masked)."""
    byte = tl.load(data_ptr + j // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - j % 2) * 4).to(tl.int32)) & 0xF  # even j: high nibble
    block = j // BLOCKSIZE
    if DOUBLE_QUANT:
        scale_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + scale_code) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    value = tl.load(code_ptr + nibble) * scale
    return tl.where(mask, value, 0.0)


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """``x`` (float32) rounded to nearest-even in ``dtype``, as ``torch.Tensor.to`` does.

    Triton's CPU interpreter truncates float32 -> bfloat16, so there the rounding is done on
    the bits: add half an ulp of bfloat16 (0x7FFF, plus 1 to break ties to even), keep the top half.
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _nf4_dequantize_kernel(
    # Pointers: output, then the NF4 arrays
    out_ptr, data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
    # Sizes and the double-quantization offset
    numel, offset,
    # Meta-parameters
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = j < numel
    value = _decode(j, mask, data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
                    offset, BLOCKSIZE, DOUBLE_QUANT)
    tl.store(out_ptr + j, _round(value, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _arrays(q: NF4Tensor) -> tuple[torch.Tensor, ...]:
    """The five arrays a kernel reads; the two nested ones stand in as dummies without double quant."""
    nested_absmax = q.nested_absmax if q.nested_absmax is not None else q.code
    nested_code = q.nested_code if q.nested_code is not None else q.code
    return q.data, q.absmax, nested_absmax, nested_code, q.code


def _check(q: NF4Tensor, device: torch.device) -> None:
    if q.data.device != device:
        raise ValueError(f"the NF4 weight is on {q.data.device} but the input is on {device}; "
                         "move one of them with .to(device)")
    if q.blocksize % 2 or q.blocksize & (q.blocksize - 1):
        raise ValueError(f"NF4 blocksize {q.blocksize} is not supported by the Triton kernels: "
                         "use a power of two (64 is the default)")


def nf4_dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight of ``q`` in ``dtype``, bit-identical to ``q.dequantize(dtype)``, in one launch."""
    _check(q, q.data.device)
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.data.device)
    numel = out.numel()
    block = 1024
    grid = (triton.cdiv(numel, block),)
    # No fused multiply-add: the reference rounds the product before adding the offset.
    _nf4_dequantize_kernel[grid](out, *_arrays(q), numel, q.offset, BLOCKSIZE=q.blocksize,
                                 DOUBLE_QUANT=q.nested_absmax is not None, BLOCK=block,
                                 INTERPRET=triton.knobs.runtime.interpret, enable_fp_fusion=False)
    return out
