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

The matmuls (``nf4_matmul.py``) decode tiles of W in registers: the packed bytes of a row
segment arrive in 16-byte vector loads, ``_unpack`` splits each byte into its two nibbles,
``_lookup`` maps a nibble to its code value through a tree of selects on its four bits (the 16
values are held in registers: no per-element memory access), and ``_block_scales`` decodes one
scale per quantization block, which then multiplies the block's 64 (blocksize) values.

This file holds those decode steps and ``nf4_dequantize``; ``nf4_matmul.py`` the matmuls.
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
# Elements per program of nf4_dequantize and its warps: 16 packed bytes (one vector load) per thread.
DEQUANTIZE_BLOCK = 4096
DEQUANTIZE_WARPS = 4


@triton.jit
def _lookup(nibble, code_ptr):
    """``code[nibble]`` for 4-bit codes of any shape, from the 16 code values held in registers.

    The 16 values are loaded once (scalars); each element then takes a tree of selects on its
    four bits, with no per-element memory access.
    """
    c0, c1, c2, c3 = tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3)
    c4, c5, c6, c7 = tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7)
    c8, c9, c10, c11 = tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11)
    c12, c13, c14, c15 = (tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14),
                          tl.load(code_ptr + 15))
    bit0, bit1, bit2, bit3 = (nibble & 1) != 0, (nibble & 2) != 0, (nibble & 4) != 0, (nibble & 8) != 0
    pair0, pair1 = tl.where(bit0, c1, c0), tl.where(bit0, c3, c2)  # codes 0-3
    pair2, pair3 = tl.where(bit0, c5, c4), tl.where(bit0, c7, c6)  # 4-7
    pair4, pair5 = tl.where(bit0, c9, c8), tl.where(bit0, c11, c10)  # 8-11
    pair6, pair7 = tl.where(bit0, c13, c12), tl.where(bit0, c15, c14)  # 12-15
    quad0, quad1 = tl.where(bit1, pair1, pair0), tl.where(bit1, pair3, pair2)
    quad2, quad3 = tl.where(bit1, pair5, pair4), tl.where(bit1, pair7, pair6)
    low, high = tl.where(bit2, quad1, quad0), tl.where(bit2, quad3, quad2)
    return tl.where(bit3, high, low)


@triton.jit
def _unpack(packed, SHAPE0: tl.constexpr, SHAPE1: tl.constexpr):
    """(SHAPE0, SHAPE1 // 2) packed bytes -> (SHAPE0, SHAPE1) nibbles; byte i holds elements 2i (high
    nibble) and 2i + 1 (low nibble)."""
    high = (packed >> 4) & 0xF
    low = packed & 0xF
    return tl.reshape(tl.join(high, low), (SHAPE0, SHAPE1))  # (SHAPE0, SHAPE1 // 2, 2) interleaved


@triton.jit
def _block_scales(block, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, DOUBLE_QUANT: tl.constexpr):
    """Float32 absmax of the quantization blocks ``block`` (any shape; 0 where masked), decoding the
    8-bit nested scales under double quantization: one lookup per block, not per element."""
    if DOUBLE_QUANT:
        scale_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + scale_code, mask=mask, other=0.0) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, scale, 0.0)


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
    # Sizes (numel elements in nbytes packed bytes) and the double-quantization offset
    numel, nbytes, offset,
    # Meta-parameters: BLOCK elements per program, SCALES = max(BLOCK // BLOCKSIZE, 1) blocks in them
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr, SCALES: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # BLOCK / 2 contiguous packed bytes per program: vector loads, nibbles split in registers.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    byte = start // 2 + tl.arange(0, BLOCK // 2)
    packed = tl.load(data_ptr + byte, mask=byte < nbytes, other=0)  # nbytes % 16 == 0: whole vectors
    values = _lookup(tl.reshape(_unpack(packed[None, :], 1, BLOCK), (BLOCK,)), code_ptr)  # (BLOCK,)
    # Elements are in flat order, so the program's quantization blocks are consecutive too.
    block = start // BLOCKSIZE + tl.arange(0, SCALES)
    scale = _block_scales(block, block < tl.cdiv(numel, BLOCKSIZE), absmax_ptr, nested_absmax_ptr,
                          nested_code_ptr, offset, DOUBLE_QUANT)  # (SCALES,)
    values = tl.reshape(tl.reshape(values, (SCALES, BLOCK // SCALES)) * scale[:, None], (BLOCK,))
    j = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + j, _round(values, out_ptr.dtype.element_ty, INTERPRET), mask=j < numel)


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
    block = max(DEQUANTIZE_BLOCK, q.blocksize)  # a power of two: whole quantization blocks per program
    grid = (triton.cdiv(numel, block),)
    # No fused multiply-add: the reference rounds the product before adding the offset.
    _nf4_dequantize_kernel[grid](out, *_arrays(q), numel, q.data.numel(), q.offset, BLOCKSIZE=q.blocksize,
                                 DOUBLE_QUANT=q.nested_absmax is not None, BLOCK=block,
                                 SCALES=block // q.blocksize, INTERPRET=triton.knobs.runtime.interpret,
                                 num_warps=DEQUANTIZE_WARPS, enable_fp_fusion=False)
    return out
