"""8-bit AdamW: loralite vs bitsandbytes (and fp32 torch.optim.AdamW), step time and state bytes.

Two parameter sets: the LoRA adapters of SmolLM2-135M (r=16 on q_proj and v_proj of 30
layers) and a dense set (four 2048x2048 matrices, as in full fine-tuning). The three
optimizers step alternately on the same gradients in one process; times are medians.
Each case runs with one torch thread and with torch's default count: on a shared machine
the one-thread figures are the steadier: a parallel op waits for its slowest thread, and
loralite's step runs ~30 torch ops per chunk of 2^20 elements where bitsandbytes runs ~15
per tensor plus 4 calls into its C library, so loralite pays that wait more often.

    python benchmarks/optim.py [--quick]

Writes benchmarks/results/optim.json and benchmarks/results/optim.md.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import bitsandbytes as bnb
import torch

from loralite.optim import AdamW8bit


def lora_shapes() -> list[tuple[int, int]]:
    """lora_A (r, in) and lora_B (out, r) of q_proj (576 -> 576) and v_proj (576 -> 192)."""
    return [shape for _ in range(30) for out in (576, 192) for shape in ((16, 576), (out, 16))]


def state_bytes(optimizer) -> int:
    return sum(v.nbytes for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.numel() > 1)


def bench(shapes, steps: int) -> dict:
    torch.manual_seed(0)
    makers = {"torch AdamW (fp32)": lambda p: torch.optim.AdamW(p, lr=1e-4),
              "bitsandbytes AdamW8bit": lambda p: bnb.optim.AdamW8bit(p, lr=1e-4),
              "loralite AdamW8bit": lambda p: AdamW8bit(p, lr=1e-4)}
    params = {name: [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes] for name in makers}
    optimizers = {name: make(params[name]) for name, make in makers.items()}
    times = {name: [] for name in makers}
    for step in range(steps + 2):  # two warm-up steps
        grads = [torch.randn(s) * 1e-3 for s in shapes]
        for name, opt in optimizers.items():
            for p, g in zip(params[name], grads):
                p.grad = g
            start = time.perf_counter()
            opt.step()
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    numel = sum(p.numel() for p in params["loralite AdamW8bit"])
    return {"parameters": numel, "tensors": len(shapes),
            "results": {name: {"step_ms": 1e3 * statistics.median(times[name]),
                               "state_bytes_per_param": state_bytes(optimizers[name]) / numel}
                        for name in makers}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, for a smoke test")
    args = parser.parse_args()
    steps = 5 if args.quick else 20
    default_threads = torch.get_num_threads()
    cases = {"lora r=16 (SmolLM2-135M q,v)": lora_shapes(), "dense 4 x 2048x2048": [(2048, 2048)] * 4}
    report = {"cpu_count": os.cpu_count(), "steps": steps, "cases": {}}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for case, shapes in cases.items():
            report["cases"][f"{case}, {threads} thread(s)"] = {"threads": threads, **bench(shapes, steps)}
    torch.set_num_threads(default_threads)
    lines = ["| case | threads | optimizer | step (ms) | state bytes/param | step time vs bitsandbytes |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for case, data in report["cases"].items():
        base = data["results"]["bitsandbytes AdamW8bit"]["step_ms"]
        for name, r in data["results"].items():
            lines.append(f"| {case.rsplit(',', 1)[0]} ({data['parameters']:,} params) | {data['threads']} | {name} | "
                         f"{r['step_ms']:.2f} | {r['state_bytes_per_param']:.3f} | {r['step_ms'] / base:.2f}x |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "optim.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "optim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
