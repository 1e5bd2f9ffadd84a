"""NF4 benchmark: loralite vs bitsandbytes (CPU) vs a bf16 nn.Linear, side by side in one process.

Measures, on Llama-7B weight shapes,
  1. quantize throughput (bf16 weight -> NF4 with double quantization, blocksize 64),
  2. dequantize throughput (NF4 -> bf16),
  3. forward + backward (input gradient) of a frozen 4-bit linear at M tokens, against a frozen
     bf16 ``nn.Linear`` and, because torch's bf16 CPU matmul runs ``g @ W`` (the input gradient)
     up to ~50x slower than ``x @ W.T``, also against a bf16 linear whose backward takes the fast
     form on a transposed weight, as ``Linear4bit`` does: the fair yardstick for the dequantize cost.

Each case runs the implementations interleaved and keeps the best of ``--repeats`` runs, so
the ratios stay meaningful on a busy machine. Writes ``<out>.json`` and ``<out>.md``.

    python benchmarks/nf4.py            # 4096x4096 and 11008x4096, M = 1, 16, 512, 2048
    python benchmarks/nf4.py --quick    # small shapes, a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from torch import nn

from loralite import nf4, ops
from loralite.files import atomic_write_text
from loralite.quantize import Linear4bit, NF4Config

FULL = dict(shapes=[(4096, 4096), (11008, 4096)], linear_shape=(4096, 4096), tokens=[1, 16, 512, 2048])
QUICK = dict(shapes=[(1024, 1024), (2752, 1024)], linear_shape=(1024, 1024), tokens=[1, 16, 128])


def best_ms(fns: dict, repeats: int) -> dict:
    """Best wall time in ms of each function, the functions interleaved.

    The first call of each is a warm-up, and counts as one of the ``repeats`` when it took over a
    second (bf16 matmuls at M = 2048 take minutes on a CPU without bf16 units; warming up is moot).
    """
    times, slow = {}, True
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        times[name] = (time.perf_counter() - start) * 1e3
        slow = slow and times[name] > 1e3
    if not slow:
        times = {name: float("inf") for name in fns}
    for _ in range(repeats - slow):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times[name], (time.perf_counter() - start) * 1e3)
    return times


def bench_quantize(shape, repeats: int) -> list[dict]:
    w = torch.randn(shape, dtype=torch.bfloat16)
    q = nf4.quantize(w)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(q.dequantize(), bnb_functional.dequantize_4bit(packed, state))  # same bytes, same values
    rows = []
    for op, fns in [
        ("quantize", {"loralite": lambda: nf4.quantize(w),
                      "bitsandbytes": lambda: bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                                           quant_type="nf4")}),
        ("dequantize, reference", {"loralite": lambda: q.dequantize(),
                                   "bitsandbytes": lambda: bnb_functional.dequantize_4bit(packed, state)}),
        # what Linear4bit runs: loralite.ops picks the C++ operator when loralite._C is built
        ("dequantize, ops dispatch", {"loralite": lambda: ops.dequantize(q),
                                      "bitsandbytes": lambda: bnb_functional.dequantize_4bit(packed, state)}),
    ]:
        ms = best_ms(fns, repeats)
        rows.append(dict(op=op, shape=list(shape), loralite_ms=ms["loralite"], bitsandbytes_ms=ms["bitsandbytes"],
                         loralite_gweights_per_s=w.numel() / ms["loralite"] / 1e6,
                         ratio_vs_bitsandbytes=ms["loralite"] / ms["bitsandbytes"]))
    return rows


class _TransposedBackwardLinear(torch.autograd.Function):
    """``x @ W.T`` for a frozen W whose input gradient is ``g @ (W.T).T``, the fast form, like Linear4bit's."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        return torch.nn.functional.linear(grad, ctx.weight.T.contiguous()), None


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run():
        x.grad = None
        layer(x).backward(grad)
    return run


def bench_linear(shape, tokens: int, repeats: int) -> dict:
    out_features, in_features = shape
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    ours = Linear4bit.from_linear(dense, NF4Config(compute_dtype=torch.bfloat16))
    theirs = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                               compress_statistics=True, quant_type="nf4")
    theirs.load_state_dict(dense.state_dict())
    theirs = theirs.to("cpu")  # bitsandbytes quantizes on the move
    x = torch.randn(tokens, in_features, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out_features, dtype=torch.bfloat16)
    def transposed_dense():
        x.grad = None
        _TransposedBackwardLinear.apply(x, dense.weight).backward(grad)

    ms = best_ms({"loralite": fwd_bwd(ours, x, grad), "bitsandbytes": fwd_bwd(theirs, x, grad),
                  "bf16_linear": fwd_bwd(dense, x, grad), "bf16_linear_transposed": transposed_dense}, repeats)
    return dict(op="forward+backward", shape=list(shape), tokens=tokens, loralite_ms=ms["loralite"],
                bitsandbytes_ms=ms["bitsandbytes"], bf16_linear_ms=ms["bf16_linear"],
                bf16_linear_transposed_ms=ms["bf16_linear_transposed"],
                ratio_vs_bitsandbytes=ms["loralite"] / ms["bitsandbytes"],
                ratio_vs_bf16_linear=ms["loralite"] / ms["bf16_linear"],
                ratio_vs_bf16_linear_transposed=ms["loralite"] / ms["bf16_linear_transposed"])


def markdown(result: dict) -> str:
    lines = [f"# NF4 benchmark ({'quick' if result['quick'] else 'full'})", "",
             f"{result['machine']}, torch {result['torch']}, bitsandbytes {result['bitsandbytes']}, "
             f"{result['threads']} threads. Best of {result['repeats']} interleaved runs; ratio < 1 means loralite "
             "is faster.", "",
             "| op | shape | loralite ms | bitsandbytes ms | loralite / bnb | Mweights/s (loralite) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["throughput"]:
        lines.append(f"| {r['op']} | {r['shape'][0]}x{r['shape'][1]} | {r['loralite_ms']:.1f} | "
                     f"{r['bitsandbytes_ms']:.1f} | {r['ratio_vs_bitsandbytes']:.2f} | "
                     f"{r['loralite_gweights_per_s'] * 1e3:.0f} |")
    lines += ["", "| forward+backward | M | loralite ms | bitsandbytes ms | bf16 nn.Linear ms | "
              "bf16 linear, transposed backward ms | loralite / bnb | loralite / bf16 | loralite / bf16 transposed |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["linear"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['loralite_ms']:.1f} | "
                     f"{r['bitsandbytes_ms']:.1f} | {r['bf16_linear_ms']:.1f} | {r['bf16_linear_transposed_ms']:.1f} | "
                     f"{r['ratio_vs_bitsandbytes']:.2f} | {r['ratio_vs_bf16_linear']:.2f} | "
                     f"{r['ratio_vs_bf16_linear_transposed']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and M, for a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3, quick 2)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="forward+backward token counts M (default 1 16 512 2048, quick 1 16 128)")
    parser.add_argument("--out", default=None,
                        help="output path without suffix (default benchmarks/results/nf4, quick: nf4_quick)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 3)
    out = Path(args.out or Path(__file__).parent / "results" / ("nf4_quick" if args.quick else "nf4"))

    result = dict(quick=args.quick, repeats=repeats, machine=f"{platform.machine()} {platform.processor()}".strip(),
                  threads=torch.get_num_threads(), torch=torch.__version__, bitsandbytes=bnb.__version__,
                  throughput=[], linear=[])
    for shape in plan["shapes"]:
        result["throughput"] += bench_quantize(shape, repeats)
        print(result["throughput"][-2:], flush=True)
    for tokens in args.tokens or plan["tokens"]:
        result["linear"].append(bench_linear(plan["linear_shape"], tokens, repeats))
        print(result["linear"][-1], flush=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
