"""The compute dtype that picks itself: ``"auto"`` is bfloat16 where the chip computes it fast.

| device | ``"auto"`` is |
| --- | --- |
| CUDA, sm_80 and newer (bf16 tensor cores); also where no GPU is here to ask (sizing a GPU run) | bfloat16 |
| CUDA before sm_80 | float32 |
| CPU with AVX512-BF16 or AMX-BF16, where a short bf16 matmul beats float32 by ``BF16_MIN_SPEEDUP`` | bfloat16 |
| any other CPU (AVX2 only: torch's bf16 matmul there is slower than float32) | float32 |

The CPU's features come from ``/proc/cpuinfo``; the measurement runs once per process, the
first time a CPU with bf16 units resolves ``"auto"``. The same features
say whether a 16-bit input gradient ``g @ W`` needs its transposed-weight form
(``transposes_16bit_gradient``): without native units for that dtype, torch's CPU kernel for
``g @ W`` runs at a small fraction of ``x @ W.T``.
"""

from __future__ import annotations

import functools
import time

import torch

AUTO = "auto"
# bf16 must be at least this much faster than float32 in both matmul forms to be chosen on CPU.
BF16_MIN_SPEEDUP = 1.5
# /proc/cpuinfo flags of native 16-bit matmul units, by dtype.
_NATIVE_UNITS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
# Flags reported with benchmark results: the ones that change which CPU kernels run.
REPORTED_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


@functools.cache
def cpu_features() -> frozenset[str]:
    """The flags of ``/proc/cpuinfo`` (Linux); empty where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_units(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bfloat16 or float16) in hardware."""
    return any(flag in cpu_features() for flag in _NATIVE_UNITS.get(dtype, ()))


def transposes_16bit_gradient(dtype: torch.dtype) -> bool:
    """Whether the CPU input gradient ``g @ W`` in ``dtype`` should run as ``g @ (W.T).T`` on a
    transposed copy of W: for a 16-bit dtype without native units (torch's kernel for that form
    is then up to ~50x slower than for ``x @ W.T``)."""
    return dtype in _NATIVE_UNITS and not has_native_units(dtype)


def _seconds(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_bf16_speedup() -> float:
    """How much faster a (256, 1024) x (1024, 1024) bf16 matmul runs than float32 on this CPU,
    in the slower of the two forms training takes (``x @ W.T`` and ``g @ W``); best of 3 each."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 1024, generator=gen), torch.randn(1024, 1024, generator=gen)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd = x.to(dtype), w.to(dtype)
        times[dtype] = max(_seconds(lambda: xd @ wd.T), _seconds(lambda: xd @ wd))
    return times[torch.float32] / times[torch.bfloat16]


def cpu_prefers_bf16() -> bool:
    """bf16 units, and bf16 measured at least ``BF16_MIN_SPEEDUP`` times faster than float32."""
    return has_native_units(torch.bfloat16) and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def auto_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype ``"auto"`` means on ``device`` (the table above)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():  # an estimate for a GPU that is not here
            return torch.bfloat16
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_prefers_bf16() else torch.float32
    return torch.float32


def resolve(dtype: torch.dtype | str, device: torch.device | str = "cpu") -> torch.dtype:
    """``dtype`` itself, or ``auto_dtype(device)`` for ``"auto"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != AUTO:
        raise ValueError(f"compute dtype {dtype!r} is neither a torch dtype nor 'auto'")
    return auto_dtype(device)
