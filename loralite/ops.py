"""The one dispatch between the pure-PyTorch reference and the fast paths.

Every NF4 compute op has exactly one reference here (dequantize, then a dense matmul);
``loralite.kernels`` (Triton, CUDA tensors) and ``loralite._C`` (C++/CUDA) provide the
fast paths. ``LORALITE_KERNELS=reference`` forces the reference for debugging.
"""

from __future__ import annotations

import torch

from loralite.nf4 import NF4Tensor


def dequantize(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight of ``q`` in ``dtype`` (default: the dtype it was quantized from)."""
    return q.dequantize(dtype)


def nf4_matmul(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``x @ W.T`` for the NF4 weight ``W`` of shape (out, in); x: (..., in) -> (..., out)."""
    return x @ dequantize(q, x.dtype).T


def nf4_matmul_t(g: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``g @ W``, the input gradient of ``nf4_matmul``; g: (..., out) -> (..., in)."""
    return g @ dequantize(q, g.dtype)
