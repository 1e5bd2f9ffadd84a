"""NF4 kernels side by side with their peers, in one process.

CPU: GB/s of NF4 (double-quant) dequantization to bf16 -- loralite's C++ operator, the
PyTorch reference and bitsandbytes' CPU dequantize -- against the copy bandwidth
(``torch.Tensor.copy_`` of a large buffer into an existing one) measured in the same run.
Bytes counted: packed codes + scale codes + nested scales read, plus the bf16 output written
(a copy: read + write). Both libraries are timed writing into a reused buffer (like the copy;
``out=``) and into a fresh tensor, whose first-touch page faults the allocation pays for; a
form a library does not offer on this device gets a row that says so. All CPU methods run in
turns (``common.time_alternating``): median and min-max per method.

GPU (only where CUDA is available): ``loralite.ops.nf4_matmul`` (Triton; the CUDA GEMV at
M <= 8 when built) against bitsandbytes (dequantize + cuBLAS, and its 4-bit GEMV
``bnb.matmul_4bit`` at M = 1) and bf16 cuBLAS, on Llama-2-7B/70B shapes, timed with
``triton.testing.do_bench``. Reported: % of the measured device copy bandwidth at M <= 16,
% of bf16 cuBLAS TFLOP/s at M >= 2048, and time ratios.

    python benchmarks/nf4_kernels.py [--quick] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import pathlib

import torch

from common import Timing, machine_info, time_alternating
from loralite import nf4, ops
from loralite.files import atomic_write_text

# (N, K) = (out_features, in_features): Llama-2-7B q/o, gate/up, down; Llama-2-70B q/o, gate/up, down.
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
GPU_ROWS = [1, 16, 128, 2048, 8192]


# The CPU methods, by where they write: a reused buffer (as the copy does) or a fresh tensor, whose
# first-touch page faults the allocation pays for.
REUSED, FRESH = "reused buffer", "fresh tensor"
COPY, REFERENCE = "copy_ (read + write)", "PyTorch reference (NF4Tensor.dequantize)"
LORALITE = {REUSED: "loralite C++ (ops.dequantize(out=))", FRESH: "loralite C++ (ops.dequantize)"}
BNB = {REUSED: "bitsandbytes dequantize_4bit(out=)", FRESH: "bitsandbytes dequantize_4bit"}
CPU_REPEATS = {False: 11, True: 5}  # timed runs per method, by --quick
CPU_ROWS = [(COPY, REUSED), (LORALITE[REUSED], REUSED), (BNB[REUSED], REUSED),
            (LORALITE[FRESH], FRESH), (BNB[FRESH], FRESH), (REFERENCE, FRESH)]


def _bnb_cpu(w: torch.Tensor, buffer: torch.Tensor) -> tuple[dict, dict]:
    """bitsandbytes' dequantize of ``w``'s NF4 form: ({method: function}, {method: why it is missing})."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return {}, {method: "bitsandbytes not installed" for method in BNB.values()}
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    fns = {BNB[FRESH]: lambda: bnbf.dequantize_4bit(packed, state)}
    try:
        bnbf.dequantize_4bit(packed, state, out=buffer)
    except NotImplementedError:  # bitsandbytes 0.50.2 registers dequantize_4bit.out for GPUs only
        return fns, {BNB[REUSED]: "not offered by bitsandbytes on CPU (no CPU dequantize_4bit.out kernel)"}
    fns[BNB[REUSED]] = lambda: bnbf.dequantize_4bit(packed, state, out=buffer)
    return fns, {}


def cpu_section(quick: bool) -> list[dict]:
    """One row per method; each loralite row has bitsandbytes writing the same way beside it."""
    # Rows of whole 64-element blocks: bitsandbytes 0.50.2's AVX-512 CPU dequantize is wrong where
    # a row's length is not a multiple of the blocksize.
    n, k = (2048, 4096) if quick else (4096, 4096)
    w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    q = nf4.quantize(w, 64, double_quant=True)
    moved = q.nbytes - q.code.numel() * 4 - q.nested_code.numel() * 4 + w.numel() * 2  # bytes in + out
    src = torch.randn(w.numel())  # float32: as many bytes as the bf16 output, twice over
    dst = torch.empty_like(src)
    buffer = torch.empty(n, k, dtype=torch.bfloat16)  # one for both libraries: the same pages, warm
    fns = {COPY: lambda: dst.copy_(src), REFERENCE: lambda: q.dequantize(torch.bfloat16)}
    if ops.HAS_EXTENSION:
        fns[LORALITE[REUSED]] = lambda: ops.dequantize(q, torch.bfloat16, out=buffer)
        fns[LORALITE[FRESH]] = lambda: ops.dequantize(q, torch.bfloat16)
    bnb_fns, missing = _bnb_cpu(w, buffer)
    times = time_alternating({**fns, **bnb_fns}, CPU_REPEATS[quick])
    copy_rate = 2 * src.numel() * 4 / times[COPY]
    rows = []
    for method, output in CPU_ROWS:
        if method not in times and method not in missing:
            continue  # loralite without its extension: no C++ rows
        row = dict(method=method, output=output, shape=[n, k], threads=torch.get_num_threads(),
                   bytes=2 * src.numel() * 4 if method == COPY else moved)
        row.update(_rates(times.get(method), row["bytes"], copy_rate, times[REFERENCE], missing.get(method)))
        if method in LORALITE.values() and BNB[output] in times:
            row["ratio_vs_bnb_same_output"] = times[method] / times[BNB[output]]
        rows.append(row)
    return rows


def _rates(timing: Timing | None, moved: int, copy_rate: float, reference: float,
           missing: str | None) -> dict:
    """A row's timing columns; for a method not offered, the reason in place of its time."""
    if timing is None:
        return dict(ms_median=missing, ms_min_max="-", gb_per_s="-", pct_of_copy="-",
                    speedup_vs_reference="-", ratio_vs_bnb_same_output="-")
    ms, rate = timing.scaled(1e3), moved / timing
    return dict(ms_median=ms, ms_min_max=ms.spread, gb_per_s=rate / 1e9, pct_of_copy=100 * rate / copy_rate,
                speedup_vs_reference=reference / timing, ratio_vs_bnb_same_output="-")


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


def _number(value, fmt: str) -> str:
    """``value`` formatted, or as it is where it holds a reason instead of a number."""
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def _markdown(result: dict) -> str:
    meta = ", ".join(f"{key}: {value}" for key, value in result["meta"].items())
    lines = ["# NF4 kernels", "", meta, "", "## CPU: dequantize NF4 (double quant) to bf16", "",
             f"Median (min-max) of {result['meta']['cpu_repeats']} alternating runs after a warm-up; GB/s, "
             "% of copy and x reference at the median.", "",
             "| method | output | shape | threads | ms: median (min-max) | GB/s | % of copy | x reference "
             "| loralite / bnb time, same output |", "|" + " --- |" * 9]
    for r in result["cpu"]:
        ms = _number(r["ms_median"], ".3g") + ("" if r["ms_min_max"] == "-" else f" ({r['ms_min_max']})")
        lines.append(f"| {r['method']} | {r['output']} | {r['shape'][0]}x{r['shape'][1]} | {r['threads']} "
                     f"| {ms} | {_number(r['gb_per_s'], '.2f')} | {_number(r['pct_of_copy'], '.0f')} "
                     f"| {_number(r['speedup_vs_reference'], '.1f')} "
                     f"| {_number(r['ratio_vs_bnb_same_output'], '.2f')} |")
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
    bnb = importlib.metadata.version("bitsandbytes") if importlib.util.find_spec("bitsandbytes") else None
    meta = dict(**machine_info(), bitsandbytes=bnb, quick=args.quick, extension_built=ops.HAS_EXTENSION,
                cpu_repeats=CPU_REPEATS[args.quick])
    result = dict(meta=meta, cpu=cpu_section(args.quick),
                  gpu=gpu_section(args.quick) if torch.cuda.is_available() else None)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_dir / "nf4_kernels.json", json.dumps(result, indent=2) + "\n")
    markdown = _markdown(result)
    atomic_write_text(args.out_dir / "nf4_kernels.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
