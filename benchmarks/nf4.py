"""NF4 benchmark: loralite vs bitsandbytes (CPU) vs a bf16 nn.Linear, side by side in one process.

Measures, on Llama-7B weight shapes,
  1. quantize throughput (bf16 weight -> NF4 with double quantization, blocksize 64),
  2. dequantize throughput (NF4 -> bf16),
  3. forward + backward (input gradient) of a frozen 4-bit linear at M tokens, against a frozen
     bf16 ``nn.Linear`` and, because torch's bf16 CPU matmul runs ``g @ W`` (the input gradient)
     up to ~50x slower than ``x @ W.T``, also against a bf16 linear whose backward takes the fast
     form on a transposed weight, as ``Linear4bit`` does: the fair yardstick for the dequantize cost.

Each case runs the implementations interleaved and reports the median of ``--repeats`` runs with
their min-max, so the ratios (of medians) stay meaningful on a busy machine. Every result records
the CPU's model and SIMD features (bf16 matmuls are fast only with bf16 units). Writes
``<out>.json`` and ``<out>.md``.

    python benchmarks/nf4.py            # 4096x4096 and 11008x4096, M = 1, 16, 512, 2048
    python benchmarks/nf4.py --quick    # small shapes, a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from torch import nn

from common import Timing, machine_info, time_alternating
from loralite import nf4, ops
from loralite.files import atomic_write_text
from loralite.quantize import Linear4bit, NF4Config

FULL = dict(shapes=[(4096, 4096), (11008, 4096)], linear_shape=(4096, 4096), tokens=[1, 16, 512, 2048])
QUICK = dict(shapes=[(1024, 1024), (2752, 1024)], linear_shape=(1024, 1024), tokens=[1, 16, 128])


def median_ms(fns: dict, repeats: int) -> dict[str, Timing]:
    """Milliseconds per call of each function (median and samples), the functions interleaved.

    The first call of each is a warm-up, and counts as one of the ``repeats`` when every first call
    took over a second (bf16 matmuls at M = 2048 take minutes on a CPU without bf16 units; warming up
    is moot).
    """
    first = time_alternating(fns, repeats=1, warmup=0)
    slow = all(t > 1.0 for t in first.values())
    samples = {name: list(first[name].samples) if slow else [] for name in fns}
    if repeats > slow:
        for name, timing in time_alternating(fns, repeats=repeats - slow, warmup=0).items():
            samples[name] += timing.samples
    return {name: Timing(s).scaled(1e3) for name, s in samples.items()}


def ms_columns(ms: dict[str, Timing]) -> dict:
    """``{name}_ms_median`` and ``{name}_ms_min_max`` of each implementation."""
    columns = {}
    for name, timing in ms.items():
        columns.update({f"{name}_ms_median": timing, f"{name}_ms_min_max": timing.spread})
    return columns


def bench_quantize(shape, repeats: int) -> list[dict]:
    w = torch.randn(shape, dtype=torch.bfloat16)
    q = nf4.quantize(w)
    def bnb_quantize():
        return bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    packed, state = bnb_quantize()
    # Bytes only: bitsandbytes' CPU dequantize gives other values on some CPUs (tests/test_nf4.py).
    assert torch.equal(q.data, packed.view(-1)) and torch.equal(q.absmax, state.absmax)  # codes, scale codes
    def bnb_dequantize():
        return bnb_functional.dequantize_4bit(packed, state)

    rows = []
    for op, fns in [
        ("quantize", {"loralite": lambda: nf4.quantize(w), "bitsandbytes": bnb_quantize}),
        ("dequantize, reference", {"loralite": lambda: q.dequantize(), "bitsandbytes": bnb_dequantize}),
        # what Linear4bit runs: loralite.ops picks the C++ operator when loralite._C is built
        ("dequantize, ops dispatch", {"loralite": lambda: ops.dequantize(q),
                                      "bitsandbytes": bnb_dequantize}),
    ]:
        ms = median_ms(fns, repeats)
        rows.append(dict(op=op, shape=list(shape), **ms_columns(ms),
                         loralite_gweights_per_s=w.numel() / ms["loralite"] / 1e6,
                         ratio_vs_bitsandbytes=ms["loralite"] / ms["bitsandbytes"]))
    return rows


class _TransposedBackwardLinear(torch.autograd.Function):
    """``x @ W.T`` for a frozen W, its input gradient ``g @ (W.T).T``: the fast form, as in Linear4bit."""

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

    ms = median_ms({"loralite": fwd_bwd(ours, x, grad), "bitsandbytes": fwd_bwd(theirs, x, grad),
                    "bf16_linear": fwd_bwd(dense, x, grad), "bf16_linear_transposed": transposed_dense},
                   repeats)
    return dict(op="forward+backward", shape=list(shape), tokens=tokens, **ms_columns(ms),
                ratio_vs_bitsandbytes=ms["loralite"] / ms["bitsandbytes"],
                ratio_vs_bf16_linear=ms["loralite"] / ms["bf16_linear"],
                ratio_vs_bf16_linear_transposed=ms["loralite"] / ms["bf16_linear_transposed"])


def _ms(row: dict, name: str) -> str:
    """``median (min-max)`` of one implementation's times in ``row``."""
    median = row[name + "_ms_median"]
    shown = f"{median:.3g}" if median < 1000 else f"{median:,.0f}"
    return f"{shown} ({row[name + '_ms_min_max']})"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# NF4 benchmark ({'quick' if meta['quick'] else 'full'})", "",
             ", ".join(f"{key}: {value}" for key, value in meta.items()), "",
             f"Times: median (min-max) of {meta['repeats']} interleaved runs, in ms; ratios and rates are "
             "of the medians; a ratio < 1 means loralite is faster.", "",
             "| op | shape | loralite ms | bitsandbytes ms | loralite / bnb | loralite Mweights/s |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["throughput"]:
        lines.append(f"| {r['op']} | {r['shape'][0]}x{r['shape'][1]} | {_ms(r, 'loralite')} | "
                     f"{_ms(r, 'bitsandbytes')} | {r['ratio_vs_bitsandbytes']:.2f} | "
                     f"{r['loralite_gweights_per_s'] * 1e3:.0f} |")
    lines += ["", "| forward+backward, W (out x in) | M | loralite ms | bitsandbytes ms | bf16 nn.Linear ms "
              "| bf16 linear, transposed backward ms | loralite / bnb | loralite / bf16 "
              "| loralite / bf16 transposed |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["linear"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {_ms(r, 'loralite')} | "
                     f"{_ms(r, 'bitsandbytes')} | {_ms(r, 'bf16_linear')} | "
                     f"{_ms(r, 'bf16_linear_transposed')} | "
                     f"{r['ratio_vs_bitsandbytes']:.2f} | {r['ratio_vs_bf16_linear']:.2f} | "
                     f"{r['ratio_vs_bf16_linear_transposed']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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

    meta = dict(**machine_info(), bitsandbytes=bnb.__version__, quick=args.quick, repeats=repeats)
    result = dict(meta=meta, throughput=[], linear=[])
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
