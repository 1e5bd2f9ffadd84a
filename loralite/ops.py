"""The one dispatch between the pure-PyTorch reference and the fast paths.

Every NF4 compute op has exactly one reference, ``NF4Tensor.dequantize`` followed by a dense
matmul; the fast paths compute the same numbers:

| tensors | path | dequantize | matmuls |
| --- | --- | --- | --- |
| CUDA | ``triton`` | ``loralite.kernels.nf4_dequantize`` | by rows M (the table below) |
| CPU, ``loralite._C`` built | ``cpp`` | ``torch.ops.loralite.nf4_dequantize`` (and ``nf4_quantize`` for quantizing) | its dense weight (in a kept workspace), then ``torch.matmul``; 16-bit input gradients on a transposed copy where the CPU lacks units for that dtype (``precision.transposes_16bit_gradient``) |
| otherwise | ``reference`` | ``q.dequantize`` | its dense weight, then ``torch.matmul`` |

On CUDA the NF4 matmuls choose by the number of rows M (tokens) of the input:

| M | x @ W.T | g @ W |
| --- | --- | --- |
| 1 to ``GEMV_MAX_ROWS`` (8) | ``loralite._C``'s GEMV (when built with CUDA; else as the next row) | as the next row |
| up to ``fused_max_rows(device)`` | ``loralite.kernels.nf4_matmul``: tiles decoded on chip | ``nf4_matmul_t`` |
| more | ``kernels.nf4_dequantize``, then ``torch.matmul`` (cuBLAS) | the same |

The crossover is derived, not yet measured on a GPU: the dequantize path moves about 4.5 more
bytes per weight (write 2, read 2, read the 0.5 packed) than the fused kernel, and its matmul
runs at cuBLAS' rate F; the fused kernel's main loop issues 3.2 to 3.6 times the instructions of
a plain bf16 matmul per tensor-core instruction at its large tiles
(``benchmarks/results/kernel_static.md``), so when compute-bound it runs at roughly F / 3.5.
Equal times give M = 4.5 F / (2 B (3.5 - 1)) with B the memory bandwidth: about 150 on an RTX
4090 (F = 165 TFLOP/s, B = 1.0 TB/s) and about 270 on an H100 (990 TFLOP/s, 3.35 TB/s);
``FUSED_MAX_ROWS`` rounds them down to powers of two. Weights whose rows do not
hold whole quantization blocks always take the dequantize path (``NF4Tensor.rows_hold_whole_blocks``).

Decoding on CPU (no autograd) has fast paths in ``loralite._C`` beside each reference here:
``linear`` sends products of 1 to 4 rows to ``gemv``, which streams each weight once at close to
memory bandwidth (everything else is ``F.linear``), and ``linears`` several weights of one input
to ``gemv_group`` in one pass; ``rms_norm``, ``rotary`` and, for one query per sequence,
``attention`` each take one call instead of the reference's chain of small aten ops, which at
batch 1 cost as much as the weight reads. ``rotary`` keeps its operator under autograd too, with
a backward of one more call. ``dropout`` draws LoRA's dropout masks with
``loralite._C``'s counter-based ``dropout`` on CPU, ``torch.native_dropout`` elsewhere, and
``dropout_backward`` applies them in one pass (``native_dropout_backward`` elsewhere).

``LORALITE_KERNELS`` overrides the choice: ``reference`` forces the reference (for debugging);
``triton`` forces the Triton kernels, also on CPU tensors under ``TRITON_INTERPRET=1`` (for
tests). On the ``cpp`` path the matmuls dequantize into a per-thread workspace that is kept
between calls: a fresh tensor of that size would cost more in first-touch page faults than the
decode itself. It holds one dense weight, the largest seen, in each compute dtype. The NF4
functions are not differentiable themselves: ``Linear4bit``'s autograd Function
calls ``nf4_matmul`` forward and ``nf4_matmul_t`` for the input gradient.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from loralite import nf4, precision
from loralite.nf4 import NF4Tensor

# Values of the LORALITE_KERNELS environment variable.
_MODES = ("auto", "reference", "triton")
# Largest number of rows (tokens) that takes the CUDA GEMV.
GEMV_MAX_ROWS = 8
# Largest number of rows that takes the fused Triton matmuls on CUDA, by the major compute
# capability (derived in the module docstring); larger products dequantize, then use cuBLAS.
FUSED_MAX_ROWS = {8: 128, 9: 256}
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
            lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0])))
    if hasattr(torch.ops.loralite, "nf4_quantize"):
        torch.library.register_fake("loralite::nf4_quantize")(
            lambda w, blocksize, midpoints, order: (w.new_empty((-(-w.numel() // blocksize),), dtype=torch.float32),
                                                    w.new_empty(((w.numel() + 1) // 2,), dtype=torch.uint8)))
    if hasattr(torch.ops.loralite, "gemv_group"):
        torch.library.register_fake("loralite::gemv_group")(
            lambda x, weights, biases: [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights])
    if hasattr(torch.ops.loralite, "rms_norm"):
        torch.library.register_fake("loralite::rms_norm")(lambda x, weight, eps: torch.empty_like(x))
        torch.library.register_fake("loralite::rotary")(lambda x, cos, sin: torch.empty_like(x))
        torch.library.register_fake("loralite::decode_attention")(
            lambda q, k, v, mask, scale: torch.empty_like(q))
    if hasattr(torch.ops.loralite, "dropout"):
        torch.library.register_fake("loralite::dropout")(
            lambda x, p, seed: (torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)))
        torch.library.register_fake("loralite::dropout_backward")(lambda grad, keep, scale: torch.empty_like(grad))
    if hasattr(torch.ops.loralite, "nf4_gemv"):
        torch.library.register_fake("loralite::nf4_gemv")(
            lambda x, data, absmax, nested_absmax, nested_code, offset, code, n, k, blocksize:
            x.new_empty((x.shape[0], n)))
    return True


HAS_EXTENSION = _load_extension()


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


def quantize_blocks(flat: torch.Tensor, blocksize: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax float32 per block, packed uint8 codes) of the 1-D ``flat``: ``nf4.quantize_blocks``,
    or on CPU the same arithmetic in one pass of ``loralite._C``'s ``nf4_quantize``."""
    if _cpu_op_runs(_CPU_NF4_QUANTIZE, flat):
        order, midpoints = nf4.decision_boundaries(code)
        return _CPU_NF4_QUANTIZE(flat, blocksize, midpoints, order)
    return nf4.quantize_blocks(flat, blocksize, code)


_workspaces = threading.local()  # .buffers: {dtype: flat CPU tensor}, per thread


def cpu_matmuls_keep_workspace() -> bool:
    """Whether NF4 matmuls on CPU decode into the kept per-thread workspace (the ``cpp`` path);
    otherwise each decodes into a fresh tensor, through the reference's float32 values."""
    return HAS_EXTENSION and _mode() == "auto"


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


def _cpu_op(name: str):
    """``torch.ops.loralite.<name>`` when ``loralite._C`` was built with it, else None."""
    return getattr(torch.ops.loralite, name).default if HAS_EXTENSION and hasattr(torch.ops.loralite, name) else None


_CPU_NF4_QUANTIZE = _cpu_op("nf4_quantize")
_CPU_GEMV = _cpu_op("gemv")
_CPU_GEMV_GROUP = _cpu_op("gemv_group")
_CPU_DROPOUT = _cpu_op("dropout")
_CPU_DROPOUT_BACKWARD = _cpu_op("dropout_backward")
_CPU_RMS_NORM = _cpu_op("rms_norm")
_CPU_ROTARY = _cpu_op("rotary")
_CPU_DECODE_ATTENTION = _cpu_op("decode_attention")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GEMV_DTYPES = (torch.float32, torch.bfloat16)


def _needs_no_grad(*tensors: torch.Tensor | None) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _cpu_op_runs(op, x: torch.Tensor) -> bool:
    """Whether the C++ operator ``op`` may compute on ``x``: it was built, x is a CPU tensor of a
    float dtype, ``LORALITE_KERNELS`` is unset or ``auto``, and torch.compile is not tracing."""
    return (op is not None and x.is_cpu and x.dtype in _FLOAT_DTYPES and not torch.compiler.is_compiling()
            and _mode() == "auto")


def _cpu_inference(op, x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """``_cpu_op_runs``, and no gradient is needed for ``x`` or ``tensors``. These checks run for
    every linear, norm and attention of a decoded token: cheapest first."""
    return op is not None and x.is_cpu and _needs_no_grad(x, *tensors) and _cpu_op_runs(op, x)


def _gemv_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``x @ weight.T + bias`` takes the C++ GEMV: x of 1 to 4 rows in the weight's dtype
    (float32 or bfloat16), a contiguous weight, and the conditions of ``_cpu_inference``."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    return (0 < rows <= CPU_GEMV_MAX_ROWS and x.dtype == weight.dtype and x.dtype in _GEMV_DTYPES
            and (bias is None or bias.dtype == x.dtype) and weight.is_contiguous()
            and _cpu_inference(_CPU_GEMV, x, weight, bias))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; decoding-sized products on CPU take the C++ GEMV."""
    if _gemv_takes(x, weight, bias):
        return _CPU_GEMV(x, weight, bias)  # (..., out)
    return F.linear(x, weight, bias)


def linears(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """``[linear(x, w, b) for w, b in zip(weights, biases)]``; when every product takes the GEMV,
    one ``gemv_group`` call streams all the weights in one parallel pass (one wake of the threads)."""
    if _CPU_GEMV_GROUP is not None and all(_gemv_takes(x, w, b) for w, b in zip(weights, biases)):
        return _CPU_GEMV_GROUP(x, weights, biases)
    return [linear(x, w, b) for w, b in zip(weights, biases)]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension (Zhang & Sennrich, 2019).

    x is normalized in float32 and rounded to its dtype before the weight scales it, as in
    Llama. On CPU without autograd, with x and weight of one dtype, ``loralite._C``'s operator
    computes the same in one call.
    """
    if x.dtype == weight.dtype and _cpu_inference(_CPU_RMS_NORM, x, weight):
        return _CPU_RMS_NORM(x, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Rotary(torch.autograd.Function):
    """``loralite._C``'s rotary with its gradient. y = x cos + R(x) sin, with R = rotate_half
    and Rᵀ = -R, so dx = dy cos - R(dy sin); sin repeats its first half in its second (the angles
    of a RoPE table are), so R(dy sin) = R(dy) sin and dx = rotary(dy, cos, -sin), one call."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _CPU_ROTARY(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _CPU_ROTARY(dy, cos, -sin), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al., 2021): ``x * cos + rotate_half(x) * sin``.

    Args:
        x: (B, T, H, hd) queries or keys, one row per head.
        cos, sin: (B, T, hd) of each token's angles (or (1, T, hd), shared by every sequence),
            the same for all heads, in x's dtype; each
            repeats its first half in its second, as RoPE tables do.

    On CPU ``loralite._C``'s operator computes it in one call, bit for bit, and its gradient in
    another (``_Rotary``; the tables themselves take no gradient).
    """
    if (cos.dtype == x.dtype and sin.dtype == x.dtype and not (cos.requires_grad or sin.requires_grad)
            and _cpu_op_runs(_CPU_ROTARY, x)):
        return _CPU_ROTARY(x, cos, sin) if _needs_no_grad(x) else _Rotary.apply(x, cos, sin)
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, hd)
    return x * cos + rotate_half(x) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(hd)) v`` with grouped-query key/value heads.

    Args:
        q: (B, H, T, hd) queries.
        k, v: (B, Hkv, S, hd) keys and values; Hkv divides H, each serving H / Hkv query heads.
        mask: bool, broadcastable to (B, 1, T, S), True where a query may attend a key; None
            means causal attention over the same T tokens (or every key, for one query).

    Returns (B, H, T, hd). One query per sequence on CPU without autograd (a decoded token) takes
    ``loralite._C``'s ``decode_attention``; everything else ``F.scaled_dot_product_attention``.
    """
    B, H, T, hd = q.shape
    if (T == 1 and q.dtype == k.dtype == v.dtype
            and (mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1))
            and k.stride(-1) == 1 and v.stride(-1) == 1 and _cpu_inference(_CPU_DECODE_ATTENTION, q, k, v)):
        keep = None if mask is None else mask.expand(B, 1, 1, k.shape[2]).reshape(B, -1)  # (B, S)
        y = _CPU_DECODE_ATTENTION(q.transpose(1, 2), k, v, keep, 1.0 / math.sqrt(hd))  # (B, 1, H, hd)
        return y.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                          enable_gqa=H != k.shape[1])


def dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted dropout: ``(x * keep / (1 - p), keep)`` with ``keep`` a bool mask, P(keep) = 1 - p.

    Not differentiable itself (``LoraLinear``'s dropout Function is). On CPU with ``loralite._C``
    the mask comes from its counter-based operator, seeded from torch's generator (so
    ``torch.manual_seed`` reproduces it); elsewhere from ``torch.native_dropout``.
    """
    if _cpu_op_runs(_CPU_DROPOUT, x):
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return _CPU_DROPOUT(x, p, seed)
    return torch.native_dropout(x, p, True)


def dropout_backward(grad: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """The gradient of ``dropout``: ``grad * keep * scale`` with ``scale = 1 / (1 - p)``."""
    if _cpu_op_runs(_CPU_DROPOUT_BACKWARD, grad):
        return _CPU_DROPOUT_BACKWARD(grad, keep, scale)
    return torch.ops.aten.native_dropout_backward(grad, keep, scale)


def release_workspaces() -> None:
    """Frees the calling thread's matmul workspaces (they come back, as needed, with the next matmul)."""
    _workspaces.__dict__.pop("buffers", None)


def fused_max_rows(device: torch.device) -> int:
    """The most rows a fused Triton NF4 matmul takes on this CUDA device (``FUSED_MAX_ROWS``)."""
    major = torch.cuda.get_device_capability(device)[0]
    return FUSED_MAX_ROWS.get(major, FUSED_MAX_ROWS[9] if major > 9 else FUSED_MAX_ROWS[8])


def _takes_fused(a: torch.Tensor, q: NF4Tensor) -> bool:
    """On the ``triton`` path: whether the fused kernel computes this product (the table above);
    ``LORALITE_KERNELS=triton`` forces it for every size (the tests of the kernels)."""
    if _mode() == "triton":
        return True
    rows = a.numel() // max(a.shape[-1], 1)
    return q.rows_hold_whole_blocks and rows <= fused_max_rows(a.device)


def nf4_matmul(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``x @ W.T`` for the NF4 weight ``W`` of shape (out, in); x: (..., in) -> (..., out)."""
    if _uses_gemv(x, q):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
        y = torch.ops.loralite.nf4_gemv(x2, q.data, q.absmax, q.nested_absmax, q.nested_code,
                                        q.offset, q.code, q.shape[0], q.shape[1], q.blocksize)
        return y.reshape(*x.shape[:-1], q.shape[0])
    if _path(x) == "triton" and _takes_fused(x, q):
        from loralite import kernels
        return kernels.nf4_matmul(x, q)
    return x @ _dense_for_matmul(q, x.dtype).T


def nf4_matmul_t(g: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """``g @ W``, the input gradient of ``nf4_matmul``; g: (..., out) -> (..., in)."""
    if _path(g) == "triton" and _takes_fused(g, q):
        from loralite import kernels
        return kernels.nf4_matmul_t(g, q)
    dense = _dense_for_matmul(q, g.dtype)  # (out, in)
    if g.device.type == "cpu" and precision.transposes_16bit_gradient(g.dtype):
        # Without native units for g's dtype, torch's 16-bit CPU matmul is fast for x @ W.T but
        # up to ~50x slower for g @ W: transposing W first (a copy) and taking the fast form wins.
        # Where the units exist, g @ W runs as fast as x @ W.T and the copy would only cost.
        return F.linear(g, dense.T.contiguous())
    return g @ dense
