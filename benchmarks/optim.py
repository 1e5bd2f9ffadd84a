"""8-bit AdamW: loralite vs bitsandbytes (and fp32 torch.optim.AdamW), step time and state bytes.

Two parameter sets: the LoRA adapters of SmolLM2-135M (r=16 on q_proj and v_proj of 30
layers) and a dense set (four 2048x2048 matrices, as in full fine-tuning). All optimizers start
from the same parameters and step alternately on the same fresh gradients in one process;
reported: the median step time and its min-max over the timed steps.

Block sizes are compared like for like: loralite's ``AdamW8bit`` runs at 256 (bitsandbytes'
block size) and at 2048 (loralite's default). bitsandbytes 0.50.2 fixes its 8-bit optimizer
blocks at 256 (``blocksize = 256`` in ``Optimizer2State.init_state`` and in the CPU kernel
``_optimizer_update_8bit_blockwise_cpu``, and ``AdamW8bit`` takes no block size), so its
2048 row says so instead of holding a number.

Each case runs with one torch thread and with torch's default count: on a shared machine the
one-thread figures are the steadier, since a parallel op waits for its slowest thread and
loralite's step runs ~30 torch ops per chunk of ``loralite.optim._CHUNK_ELEMENTS`` where
bitsandbytes runs ~15 per tensor, so loralite pays that wait more often.

    python benchmarks/optim.py [--quick] [--out-dir benchmarks/results]

Writes OUT_DIR/optim.json and OUT_DIR/optim.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import bitsandbytes as bnb
import torch

from common import RESULTS, Timing, write_results
from loralite.optim import AdamW8bit

BNB_BLOCK_SIZE = 256  # bitsandbytes/optim/optimizer.py, Optimizer2State.init_state: `blocksize = 256`
BLOCK_SIZES = (256, 2048)
NOT_OFFERED = "not offered by bitsandbytes"


def lora_shapes() -> list[tuple[int, int]]:
    """lora_A (r, in) and lora_B (out, r) of q_proj (576 -> 576) and v_proj (576 -> 192)."""
    return [shape for _ in range(30) for out in (576, 192) for shape in ((16, 576), (out, 16))]


def state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors, each storage counted once: bitsandbytes puts its one
    codebook pair (``qmap1``, ``qmap2``) into the state of every 8-bit parameter."""
    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1:  # not the step counters
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def optimizers() -> dict:
    """name -> ``params -> optimizer``: the fp32 baseline, bitsandbytes, loralite at each block size."""
    makers = {"torch AdamW (fp32)": lambda p: torch.optim.AdamW(p, lr=1e-4),
              "bitsandbytes AdamW8bit": lambda p: bnb.optim.AdamW8bit(p, lr=1e-4)}
    for size in BLOCK_SIZES:
        makers[f"loralite AdamW8bit, block {size}"] = lambda p, size=size: AdamW8bit(p, lr=1e-4,
                                                                                     block_size=size)
    return makers


def time_steps(shapes, steps: int, warmup: int = 2) -> tuple[dict[str, Timing], dict[str, float], int]:
    """Seconds per ``step()`` of each optimizer and its state bytes per parameter.

    Returns:
        ``(times, state_bytes_per_param, parameters)``; the steps alternate between optimizers,
        each step on the same fresh gradients (set outside the timed region).
    """
    torch.manual_seed(0)
    start_values = [torch.randn(s) * 0.02 for s in shapes]
    makers = optimizers()
    params = {name: [torch.nn.Parameter(v.clone()) for v in start_values] for name in makers}
    opts = {name: make(params[name]) for name, make in makers.items()}
    samples = {name: [] for name in makers}
    for step in range(warmup + steps):
        grads = [torch.randn(s) * 1e-3 for s in shapes]
        for name, opt in opts.items():
            for p, g in zip(params[name], grads):
                p.grad = g
            start = time.perf_counter()
            opt.step()
            if step >= warmup:
                samples[name].append(time.perf_counter() - start)
    numel = sum(v.numel() for v in start_values)
    return ({name: Timing(s) for name, s in samples.items()},
            {name: state_bytes(opt) / numel for name, opt in opts.items()}, numel)


def case_rows(case: str, threads: int, shapes, steps: int) -> list[dict]:
    """The rows of one case: fp32 AdamW, then per block size bitsandbytes and loralite."""
    times, per_param, numel = time_steps(shapes, steps)

    def row(optimizer: str, block, name: str | None) -> dict:
        base = {"case": case, "params": numel, "threads": threads, "optimizer": optimizer,
                "block size": block}
        if name is None:
            return {**base, "step ms (median)": NOT_OFFERED, "step ms (min-max)": "-",
                    "state bytes/param": "-", "loralite / bnb (median step, same block size)": "-"}
        ms = times[name].scaled(1e3)
        return {**base, "step ms (median)": ms, "step ms (min-max)": ms.spread,
                "state bytes/param": per_param[name], "loralite / bnb (median step, same block size)": "-"}

    rows = [row("torch AdamW (fp32)", "-", "torch AdamW (fp32)")]
    for size in BLOCK_SIZES:
        peer = "bitsandbytes AdamW8bit" if size == BNB_BLOCK_SIZE else None
        ours = f"loralite AdamW8bit, block {size}"
        rows.append(row("bitsandbytes AdamW8bit", size, peer))
        rows.append(row("loralite AdamW8bit", size, ours))
        if peer is not None:
            rows[-1]["loralite / bnb (median step, same block size)"] = times[ours] / times[peer]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, for a smoke test")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="folder for optim.json and optim.md")
    args = parser.parse_args()
    steps = 5 if args.quick else 20
    default_threads = torch.get_num_threads()
    cases = {"lora r=16 (SmolLM2-135M q,v)": lora_shapes(), "dense 4 x 2048x2048": [(2048, 2048)] * 4}
    rows = []
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for case, shapes in cases.items():
            rows += case_rows(case, threads, shapes, steps)
    torch.set_num_threads(default_threads)
    write_results("optim", rows, folder=args.out_dir,
                  meta={"bitsandbytes": bnb.__version__, "cpu_count": os.cpu_count(), "timed_steps": steps,
                        "bitsandbytes_block_size": BNB_BLOCK_SIZE},
                  notes=f"Median and min-max of {steps} timed steps (after 2 warm-up steps), "
                        "optimizers alternating on the same gradients. bitsandbytes' 8-bit AdamW has a "
                        f"fixed block size of {BNB_BLOCK_SIZE}, so the block-2048 rows compare loralite "
                        f"with nothing; the {BNB_BLOCK_SIZE} rows are the like-for-like comparison. Tensors "
                        "under 4096 elements keep fp32 states in both libraries. State bytes count each "
                        "storage once (bitsandbytes' shared codebooks included).")


if __name__ == "__main__":
    main()
