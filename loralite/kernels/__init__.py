"""Triton kernels for loralite, installed as ``loralite.kernels`` (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""

from loralite.kernels.nf4 import nf4_dequantize
from loralite.kernels.nf4_matmul import nf4_matmul, nf4_matmul_t

__all__ = ["nf4_dequantize", "nf4_matmul", "nf4_matmul_t"]
