"""NF4 kernels side by side with their peers, in one process.

CPU: GB/s of NF4 (double-quant) dequantization to bf16 -- loralite's C++ operator, the
PyTorch reference and bitsandbytes' CPU dequantize -- against the copy bandwidth
(``torch.Tensor.copy_`` of a large buffer into an existing one) measured in the same run.
Bytes counted: packed codes + scale codes + nested scales read, plus the bf16 output written
(a copy: read + write). The C++ operator is timed twice: writing into a reused buffer (like
the copy) and into a fresh tensor, whose first-touch page faults the allocation pays for.

GPU (only where CUDA is available): ``loralite.ops.nf4_matmul`` (Triton; the CUDA GEMV at
M <= 8 when built) against bitsandbytes (dequantize + cuBLAS, and its 4-bit GEMV
``bnb.matmul_4bit`` at M = 1) and bf16 cuBLAS, on Llama-2-7B/70B shapes, timed with
``triton.testing.do_bench``. Reported: % of the measured device copy bandwidth at M <= 16,
% of bf16 cuBLAS TFLOP/s at M >= 2048, and time ratios.

    python benchmarks/nf4_kernels.py [--quick] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import time

import torch

from loralite import nf4, ops
from loralite.files import atomic_write_text

# (N, K) = (out_features, in_features): Llama-2-7B q/o, gate/up, down; Llama-2-70B q/o, gate/up, down.
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
GPU_ROWS = [1, 16, 128, 2048, 8192]


def _seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up (CPU)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def cpu_section(quick: bool) -> list[dict]:
    n, k = (2048, 4096) if quick else (4096, 4096)
    repeats = 5 if quick else 11
    w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    q = nf4.quantize(w, 64, double_quant=True)
    moved = q.nbytes - q.code.numel() * 4 - q.nested_code.numel() * 4 + w.numel() * 2  # bytes in + out
    src = torch.randn(w.numel())  # float32: as many bytes as the bf16 output, twice over
    dst = torch.empty_like(src)
    rows = [dict(method="copy_ (read + write)", seconds=_seconds(lambda: dst.copy_(src), repeats),
                 bytes=2 * src.numel() * 4)]
    if ops.HAS_EXTENSION:
        buffer = torch.empty(n, k, dtype=torch.bfloat16)
        rows.append(dict(method="loralite C++, into a reused buffer (ops.dequantize(out=))", bytes=moved,
                         seconds=_seconds(lambda: ops.dequantize(q, torch.bfloat16, out=buffer), repeats)))
        rows.append(dict(method="loralite C++, fresh output (ops.dequantize)", bytes=moved,
                         seconds=_seconds(lambda: ops.dequantize(q, torch.bfloat16), repeats)))
    rows.append(dict(method="PyTorch reference (NF4Tensor.dequantize)", bytes=moved,
                     seconds=_seconds(lambda: q.dequantize(torch.bfloat16), repeats)))
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        rows.append(dict(method="bitsandbytes dequantize_4bit (CPU)", bytes=moved,
                         seconds=_seconds(lambda: bnbf.dequantize_4bit(packed, state), repeats)))
    copy_rate = rows[0]["bytes"] / rows[0]["seconds"]
    reference = next(row for row in rows if row["method"].startswith("PyTorch reference"))
    for row in rows:
        rate = row["bytes"] / row["seconds"]
        row.update(shape=[n, k], threads=torch.get_num_threads(), gb_per_s=rate / 1e9,
                   pct_of_copy=100 * rate / copy_rate, speedup_vs_reference=reference["seconds"] / row["seconds"])
    return rows


def _bnb_cuda(w: torch.Tensor):
    """bitsandbytes' (dequantize + cuBLAS, matmul_4bit) for the bf16 weight ``w``, or None without it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    return (lambda x: x @ bnbf.dequantize_4bit(packed, state).T,
            lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state))


def _gpu_row(n: int, k: int, m: int, w: torch.Tensor, q, bnb, copy_rate: float) -> dict:
    from triton.testing import do_bench

    from loralite import kernels

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    expected = x @ q.dequantize(torch.bfloat16).T
    error = ((ops.nf4_matmul(x, q).float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    row = dict(n=n, k=k, m=m, max_rel_error=error,
               cublas_bf16_ms=do_bench(lambda: x @ w.T),
               loralite_ms=do_bench(lambda: ops.nf4_matmul(x, q)),
               triton_ms=do_bench(lambda: kernels.nf4_matmul(x, q)))
    if bnb is not None:
        row["bnb_dequant_cublas_ms"] = do_bench(lambda: bnb[0](x))
        if m == 1:
            row["bnb_gemv_ms"] = do_bench(lambda: bnb[1](x))
        row["vs_bnb"] = row["loralite_ms"] / min(v for key, v in row.items() if key.startswith("bnb_"))
    row["vs_cublas"] = row["loralite_ms"] / row["cublas_bf16_ms"]
    if m <= 16:  # bandwidth-bound: bytes of the packed weight and its scales, x and y
        moved = q.nbytes + 2 * m * (n + k)
        row["pct_of_copy_bandwidth"] = 100 * moved / (row["loralite_ms"] * 1e-3) / copy_rate
    if m >= 2048:  # compute-bound: also the backward product g @ W
        row["tflops"] = 2 * m * n * k / (row["loralite_ms"] * 1e-3) / 1e12
        row["pct_of_cublas_tflops"] = 100 * row["cublas_bf16_ms"] / row["loralite_ms"]
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        row["backward_cublas_bf16_ms"] = do_bench(lambda: g @ w)
        row["backward_loralite_ms"] = do_bench(lambda: ops.nf4_matmul_t(g, q))
    return row


def gpu_section(quick: bool) -> dict:
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_rate = 2 * src.numel() / (do_bench(lambda: dst.copy_(src)) * 1e-3)  # bytes/s, read + write
    del src, dst
    shapes = [GPU_SHAPES[0], GPU_SHAPES[4]] if quick else GPU_SHAPES
    rows = []
    for n, k in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q = nf4.quantize(w, 64, double_quant=True)
        bnb = _bnb_cuda(w)
        for m in ([1, 16, 2048] if quick else GPU_ROWS):
            rows.append(_gpu_row(n, k, m, w, q, bnb, copy_rate))
            print(json.dumps(rows[-1]), flush=True)
        del w, q, bnb
        torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(), copy_gb_per_s=copy_rate / 1e9,
                gemv_built=hasattr(torch.ops.loralite, "nf4_gemv"), rows=rows)


def _markdown(result: dict) -> str:
    lines = [f"# NF4 kernels ({result['machine']})", "", "## CPU: dequantize NF4 (double quant) to bf16", "",
             "| method | shape | threads | GB/s | % of copy | x reference |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["cpu"]:
        lines.append(f"| {r['method']} | {r['shape'][0]}x{r['shape'][1]} | {r['threads']} | {r['gb_per_s']:.2f} "
                     f"| {r['pct_of_copy']:.0f}% | {r['speedup_vs_reference']:.1f} |")
    gpu = result["gpu"]
    lines += ["", "## GPU: y = x @ W.T, W NF4 (N, K), x bf16 (M, K)", ""]
    if gpu is None:
        lines.append("Not run: no CUDA device in this run.")
        return "\n".join(lines) + "\n"
    lines += [f"{gpu['device']}; device copy {gpu['copy_gb_per_s']:.0f} GB/s; CUDA GEMV built: {gpu['gemv_built']}.", "",
              "| N x K | M | loralite ms | bf16 cuBLAS ms | bnb dequant+cuBLAS ms | bnb GEMV ms | x cuBLAS | x bnb "
              "| % copy BW | % cuBLAS TFLOP/s | backward ms (cuBLAS) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(row, key, fmt):
        return format(row[key], fmt) if key in row else "-"

    for r in gpu["rows"]:
        backward = (f"{r['backward_loralite_ms']:.3f} ({r['backward_cublas_bf16_ms']:.3f})"
                    if "backward_loralite_ms" in r else "-")
        lines.append(f"| {r['n']}x{r['k']} | {r['m']} | {r['loralite_ms']:.4f} | {r['cublas_bf16_ms']:.4f} "
                     f"| {cell(r, 'bnb_dequant_cublas_ms', '.4f')} | {cell(r, 'bnb_gemv_ms', '.4f')} "
                     f"| {r['vs_cublas']:.2f} | {cell(r, 'vs_bnb', '.2f')} | {cell(r, 'pct_of_copy_bandwidth', '.0f')} "
                     f"| {cell(r, 'pct_of_cublas_tflops', '.0f')} | {backward} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller CPU matrix, fewer GPU shapes and rows")
    parser.add_argument("--out-dir", default=pathlib.Path(__file__).parent / "results", type=pathlib.Path,
                        help="folder for nf4_kernels.json and nf4_kernels.md")
    args = parser.parse_args()
    result = dict(machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                  quick=args.quick, extension_built=ops.HAS_EXTENSION, cpu=cpu_section(args.quick),
                  gpu=gpu_section(args.quick) if torch.cuda.is_available() else None)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "nf4_kernels.json", json.dumps(result, indent=2) + "\n")
    markdown = _markdown(result)
    atomic_write_text(args.out_dir / "nf4_kernels.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
