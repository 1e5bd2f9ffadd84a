"""The one dispatch between the pure-PyTorch reference and the fast paths.

Every NF4 compute op has exactly one reference, ``NF4Tensor.dequantize`` followed by a dense
matmul; the fast paths compute the same numbers:

| tensors | path | dequantize | matmuls |
| --- | --- | --- | --- |
| CUDA | ``triton`` | ``loralite.kernels.nf4_dequantize`` | ``loralite.kernels.nf4_matmul{,_t}``; ``loralite._C``'s GEMV for x @ W.T with M <= 8 rows |
| CPU, ``loralite._C`` built | ``cpp`` | ``torch.ops.loralite.nf4_dequantize`` | its dense weight (in a kept workspace), then ``torch.matmul``; 16-bit input gradients on a transposed copy |
| otherwise | ``reference`` | ``q.dequantize`` | its dense weight, then ``torch.matmul`` |

Dense weights have one fast path: ``linear`` sends the 1 to 4 row products of decoding on CPU
(no autograd) to ``loralite._C``'s ``gemv``, which streams each weight once at close to memory
bandwidth; everything else is ``F.linear``. ``dropout`` draws LoRA's dropout masks with
``loralite._C``'s counter-based ``dropout`` on CPU, ``torch.native_dropout`` elsewhere.

``LORALITE_KERNELS`` overrides the choice: ``reference`` forces the reference (for debugging);
``triton`` forces the Triton kernels, also on CPU tensors under ``TRITON_INTERPRET=1`` (for
tests). On the ``cpp`` path the matmuls dequantize into a per-thread workspace that is kept
between calls: a fresh tensor of that size would cost more in first-touch page faults than the
decode itself. It holds one dense weight, the largest seen, in each compute dtype. These
functions are not differentiable themselves: ``Linear4bit``'s autograd Function
calls ``nf4_matmul`` forward and ``nf4_matmul_t`` for the input gradient.
"""

from __future__ import annotations

import importlib.util
import os
import threading

import torch
import torch.nn.functional as F

from loralite.nf4 import NF4Tensor

# Values of the LORALITE_KERNELS environment variable.
_MODES = ("auto", "reference", "triton")
# Largest number of rows (tokens) that takes the CUDA GEMV.
GEMV_MAX_ROWS = 8
# Largest number of rows that takes the CPU GEMV for dense weights (loralite::gemv).
CPU_GEMV_MAX_ROWS = 4


def _load_extension() -> bool:
    """Loads ``loralite._C``'s operators into ``torch.ops.loralite``; False when it was not built."""
    spec = importlib.util.find_spec("loralite._C")
    if spec is None or spec.origin is None:
        return False
    torch.ops.load_library(spec.origin)
    # Shapes for torch.compile's fake tensors: the operators allocate their outputs like this.
    torch.library.register_fake("loralite::nf4_dequantize")(
        lambda data, absmax, nested_absmax, nested_code, offset, code, blocksize, numel, dtype:
        data.new_empty((numel,), dtype=dtype))
    if hasattr(torch.ops.loralite, "gemv"):
        torch.library.register_fake("loralite::gemv")(
            lambda x, weight, bias: x.new_empty((x.shape[0], weight.shape[0])))
    if hasattr(torch.ops.loralite, "dropout"):
        torch.library.register_fake("loralite::dropout")(
            lambda x, p, seed: (torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)))
    if hasattr(torch.ops.loralite, "nf4_gemv"):
        torch.library.register_fake("loralite::nf4_gemv")(
            lambda x, data, absmax, nested_absmax, nested_code, offset, code, n, k, blocksize:
            x.new_empty((x.shape[0], n)))
    return True


HAS_EXTENSION = _load_extension()
HAS_CPU_GEMV = HAS_EXTENSION and hasattr(torch.ops.loralite, "gemv")


def _mode() -> str:
    """The value of ``LORALITE_KERNELS`` ("auto" when unset), checked."""
    mode = os.environ.get("LORALITE_KERNELS", "auto")
    if mode not in _MODES:
        raise ValueError(f"LORALITE_KERNELS={mode!r} is not one of {', '.join(_MODES)}; unset it "
                         "to let loralite choose the kernels")
    return mode


def _path(t: torch.Tensor) -> str:
    """'triton', 'cpp' or 'reference': the path for an op on ``t``'s device (see the table above)."""
    mode = _mode()
    if mode != "auto":
        return mode
    if t.is_cuda:
        return "triton"
    return "cpp" if HAS_EXTENSION and t.device.type == "cpu" else "reference"


def _uses_gemv(x: torch.Tensor, q: NF4Tensor) -> bool:
    """Whether ``x @ W.T`` takes the CUDA GEMV: built, decode-sized, and a layout it supports."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (_mode() == "auto" and x.is_cuda
            and hasattr(torch.ops.loralite, "nf4_gemv") and 1 <= rows <= GEMV_MAX_ROWS
            and q.shape[1] % 32 == 0 and q.blocksize % 32 == 0)


def dequantize(q: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight of ``q`` in ``dtype`` (default: the dtype it was quantized from).

    Args:
        out: optional contiguous buffer of ``q.shape`` and ``dtype`` to write into; reusing one
            saves the allocation (on CPU, first-touch page faults cost as much as the decode).
    """
    dtype = dtype or q.dtype
    path = _path(q.data)
    if path == "cpp":
        args = (q.data, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, q.blocksize,
                q.shape.numel(), dtype)
        if out is None:
            return torch.ops.loralite.nf4_dequantize(*args).view(q.shape)
        torch.ops.loralite.nf4_dequantize.out(*args, out=out.view(-1))
        return out
    if path == "triton":
        from loralite import kernels  # imports Triton, only where it runs
        dense = kernels.nf4_dequantize(q, dtype)
    else:
        dense = q.dequantize(dtype)
    return dense if out is None else out.copy_(dense)


_workspaces = threading.local()  # .buffers: {dtype: flat CPU tensor}, per thread


def _dense_for_matmul(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q`` dequantized for one matmul. On the ``cpp`` path it lands in the calling thread's
    workspace (grown to the largest weight seen), valid only until the next call."""
    if _path(q.data) != "cpp" or torch.compiler.is_compiling():
        return dequantize(q, dtype)
    buffers = _workspaces.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < q.numel:
        buffers[dtype] = buffer = torch.empty(q.numel, dtype=dtype)
    return dequantize(q, dtype, out=buffer[:q.numel].view(q.shape))


_CPU_GEMV = torch.ops.loralite.gemv.default if HAS_CPU_GEMV else None
_GEMV_DTYPES = (torch.float32, torch.bfloat16)


def _needs_no_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad
                                               or (bias is not None and bias.requires_grad))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; decoding-sized products on CPU take the C++ GEMV.

    The GEMV runs when ``loralite._C`` is built, ``LORALITE_KERNELS`` is unset or ``auto``, x has
    1 to 4 rows on CPU in the weight's dtype (float32 or bfloat16), and no gradient is needed.
    These checks run on every call of every linear, so they are ordered cheapest-exit first.
    """
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if (_CPU_GEMV is None or not 0 < rows <= CPU_GEMV_MAX_ROWS or x.device.type != "cpu"
            or x.dtype != weight.dtype or x.dtype not in _GEMV_DTYPES or not _needs_no_grad(x, weight, bias)
            or (bias is not None and bias.dtype != x.dtype) or not weight.is_contiguous()
            or _mode() != "auto" or torch.compiler.is_compiling()):
        return F.linear(x, weight, bias)
    y = _CPU_GEMV(x.reshape(rows, k), weight, bias)  # (rows, out)
    return y.view(*x.shape[:-1], weight.shape[0])


_CPU_DROPOUT = torch.ops.loralite.dropout.default if HAS_EXTENSION and hasattr(torch.ops.loralite, "dropout") \
    else None
_DROPOUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted dropout: ``(x * keep / (1 - p), keep)`` with ``keep`` a bool mask, P(keep) = 1 - p.

    Not differentiable itself (``LoraLinear``'s dropout Function is). On CPU with ``loralite._C``
    the mask comes from its counter-based operator, seeded from torch's generator (so
    ``torch.manual_seed`` reproduces it); elsewhere from ``torch.native_dropout``.
    """
    if (_CPU_DROPOUT is not None and x.device.type == "cpu" and x.dtype in _DROPOUT_DTYPES
            and _mode() == "auto" and not torch.compiler.is_compiling()):
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return _CPU_DROPOUT(x, p, seed)
    return torch.native_dropout(x, p, True)


def release_workspaces() -> None:
    """Frees the calling thread's matmul workspaces (they come back, as needed, with the next matmul)."""
    _workspaces.__dict__.pop("buffers", None)


def nf4_matmul(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``x @ W.T`` for the NF4 weight ``W`` of shape (out, in); x: (..., in) -> (..., out)."""
    if _uses_gemv(x, q):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
        y = torch.ops.loralite.nf4_gemv(x2, q.data, q.absmax, q.nested_absmax, q.nested_code,
                                        q.offset, q.code, q.shape[0], q.shape[1], q.blocksize)
        return y.reshape(*x.shape[:-1], q.shape[0])
    if _path(x) == "triton":
        from loralite import kernels
        return kernels.nf4_matmul(x, q)
    return x @ _dense_for_matmul(q, x.dtype).T


def nf4_matmul_t(g: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``g @ W``, the input gradient of ``nf4_matmul``; g: (..., out) -> (..., in)."""
    if _path(g) == "triton":
        from loralite import kernels
        return kernels.nf4_matmul_t(g, q)
    dense = _dense_for_matmul(q, g.dtype)  # (out, in)
    if g.device.type == "cpu" and g.dtype in (torch.bfloat16, torch.float16):
        # torch's 16-bit CPU matmul is fast for x @ W.T but up to ~50x slower for g @ W (measured
        # with bf16 on AVX2): transposing W first (a copy) and taking the fast form wins by far.
        return F.linear(g, dense.T.contiguous())
    return g @ dense
