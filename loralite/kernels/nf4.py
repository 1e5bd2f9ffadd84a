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
``_lookup`` maps a nibble to its code value by a gather from the 16-entry table on chip (no
per-element global memory access), and ``_block_scales`` decodes one
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
    """``code[nibble]`` for 4-bit codes of any shape, gathered from the 16-entry table.

    The table is loaded once per call (one vector), and the gather happens on chip: Triton lowers
    it to shared-memory reads, with no per-element global memory access.
    """
    table = tl.load(code_ptr + tl.arange(0, 16))  # (16,)
    flat = tl.reshape(nibble, (nibble.numel,)).to(tl.int32)
    return tl.reshape(tl.gather(table, flat, 0), nibble.shape)


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
    packed = tl.load(data_ptr + byte, mask=byte < nbytes, other=0)  # whole vectors where nbytes % 16 == 0
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
