"""Peak memory of real LoRA / QLoRA training steps against ``loralite.estimate_memory``.

Each case runs in a fresh subprocess with random weights (the values do not change the
memory). The model is built on the meta device; every NF4 linear gets its own copy of a
template quantized once per shape, so a 7B model is built in seconds and never holds a dense
copy of its weights. One step runs first to create the optimizer states; the measured step is
the next, steady one (forward with the fused cross-entropy of ``labels=``, backward, optimizer
step, ``zero_grad``).

Measured:
- CPU: the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the
  step) minus the resident set right after imports. glibc keeps freed heap memory for reuse,
  which would inflate the resident set; ``MALLOC_MMAP_THRESHOLD_=65536`` gives every tensor
  over 64 KiB its own mapping, returned to the system when the tensor is freed, so the
  resident set follows the live tensors (PyTorch's CPU allocator does not cache).
- CPU and CUDA, "allocated": the bytes of the weights, adapters and optimizer states plus the
  peak of tensors allocated during the step (``TensorMemoryTracker`` on CPU,
  ``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/memory.py            # CPU: SmolLM2-135M, Llama-3.2-1B, a Llama-2-7B shape
    python benchmarks/memory.py --quick    # SmolLM2-135M only
    python benchmarks/memory.py --model llama-2-7b   # one model's cases, merged into the JSON
    python benchmarks/memory.py --dtype float32      # only the float32 cases, merged likewise
    python benchmarks/memory.py --device cuda   # 7B, 13B (and 70B) at several sequence lengths
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# (model, method, batch, seq_len, gradient checkpointing, dtype of the model and its activations)
CPU_CASES = [  # bf16 matmuls run at a few GFLOP/s on a CPU without bf16 units: larger models in float32
    ("smollm2-135m", "qlora", 1, 256, False, "bfloat16"),
    ("smollm2-135m", "lora", 1, 256, False, "bfloat16"),
    ("smollm2-135m", "qlora", 2, 128, True, "bfloat16"),
    ("llama-3.2-1b", "qlora", 1, 64, False, "bfloat16"),
    ("llama-3.2-1b", "lora", 1, 128, False, "float32"),
    ("llama-2-7b", "qlora", 1, 128, False, "float32"),
    ("llama-2-7b", "qlora", 1, 256, True, "float32"),
]
QUICK_CASES = CPU_CASES[:1]
CUDA_CASES = [(m, "qlora", 1, t, ckpt, "bfloat16") for m in ("llama-2-7b", "llama-2-13b") for t in (512, 2048)
              for ckpt in (False, True)] + [("llama-2-70b", "qlora", 1, 512, True, "bfloat16")]
OPTIM = {"qlora": "adamw_8bit", "lora": "adamw"}  # QLoRA's paper setup; LoRA's usual one
GIB = 2**30


def _rss(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of this process, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _build(name: str, method: str, device, dtype):
    """A random-weight model in ``dtype``: NF4 linears (cloned templates) for QLoRA, dense for LoRA; adapters on."""
    import dataclasses

    import torch

    import loralite as ll
    from loralite import nf4
    from loralite.configs import load_config

    config = load_config(name)
    with torch.device("meta"):
        model = ll.Llama(config).to(dtype)
    quant = ll.NF4Config(compute_dtype=dtype) if method == "qlora" else None
    templates = {}

    def cloned_template(module_name, linear):
        shape = tuple(linear.weight.shape)
        if shape not in templates:
            templates[shape] = nf4.quantize(torch.randn(shape, device=device, dtype=dtype) * 0.02)
        t = templates[shape]
        q = dataclasses.replace(t, data=t.data.clone(), absmax=t.absmax.clone(), nested_absmax=t.nested_absmax.clone())
        return ll.Linear4bit(q, None, quant.compute_dtype)

    if quant is not None:
        ll.quantize_model(model, quant, make=cloned_template)
    templates.clear()
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.tie_weights()
    model.requires_grad_(False)
    lora = ll.LoraConfig(r=16, alpha=32, target_modules="all-linear")
    ll.add_lora(model, lora)
    return model.train(), config, lora, quant


def _static_bytes(model, optimizer) -> int:
    """Bytes of the weights, adapters and optimizer states, counted from the objects themselves."""
    import torch

    import loralite as ll

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    nf4_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, ll.Linear4bit))
    states = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor))
    return params + nf4_bytes + states


def _warm_up(case: dict, device) -> None:
    """Two steps of a tiny model of the same kind, then freed: what is left is the runtime, not the model."""
    import torch

    import loralite as ll

    config = ll.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    dtype = getattr(torch, case["dtype"])
    model = ll.Llama(config).to(device=device, dtype=dtype).requires_grad_(False)
    if case["method"] == "qlora":
        ll.quantize_model(model, ll.NF4Config(compute_dtype=dtype))
    ll.add_lora(model, ll.LoraConfig(r=16, target_modules="all-linear"))
    model.gradient_checkpointing = case["checkpointing"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ll.AdamW8bit(params, min_8bit_size=1) if case["optim"] == "adamw_8bit" else torch.optim.AdamW(params)
    ids = torch.randint(0, 256, (1, 16), device=device)
    for _ in range(2):
        model.train()(ids, labels=ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def child(case: dict) -> dict:
    """Run one case in this (fresh) process and return the figures."""
    import torch

    import loralite as ll
    from loralite import ops
    from loralite.memory import TensorMemoryTracker, estimate_memory

    device, cuda = case["device"], case["device"] == "cuda"
    torch.manual_seed(0)
    _warm_up(case, device)  # touches the code pages and one-time buffers of every kernel the step uses
    ops.release_workspaces()  # the step under measurement allocates its own matmul workspace
    baseline = _rss("VmRSS")
    dtype = getattr(torch, case["dtype"])
    model, config, lora, quant = _build(case["model"], case["method"], device, dtype)
    model.gradient_checkpointing = case["checkpointing"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ll.AdamW8bit(params) if case["optim"] == "adamw_8bit" else torch.optim.AdamW(params)
    ids = torch.randint(0, config.vocab_size, (case["batch"], case["seq_len"]), device=device)

    def step():
        loss = model(ids, labels=ids)  # as loralite train: the head fused with the cross-entropy
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for p in params:  # the optimizer states exist from here on, as in any step after the first
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    static = _static_bytes(model, optimizer)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds, allocated, resident = time.perf_counter() - start, torch.cuda.max_memory_allocated(), None
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        start = time.perf_counter()
        with TensorMemoryTracker() as tracker:
            step()
        seconds, allocated, resident = time.perf_counter() - start, static + tracker.peak, _rss("VmHWM") - baseline
    est = estimate_memory(config, lora, quant, case["batch"], case["seq_len"], case["checkpointing"],
                          case["optim"], dtype=dtype, device="cuda" if cuda else "cpu")
    return {"estimate": est.to_dict(), "allocated": allocated, "resident": resident, "static": static,
            "seconds": seconds}


def run_case(model, method, batch, seq_len, checkpointing, dtype, device) -> dict:
    """One case in a subprocess; returns a results row."""
    case = dict(model=model, method=method, batch=batch, seq_len=seq_len, checkpointing=checkpointing,
                dtype=dtype, optim=OPTIM[method], device=device)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    est = out["estimate"]
    row = {"model": model, "method": method, "dtype": dtype, "optim": case["optim"], "batch": batch,
           "seq": seq_len, "checkpointing": checkpointing, "trainable": est["trainable_parameters"],
           "estimate_GiB": est["total"] / GIB, "allocated_GiB": out["allocated"] / GIB,
           "allocated/estimate": out["allocated"] / est["total"]}
    if out["resident"] is not None:
        row.update({"resident_GiB": out["resident"] / GIB, "resident/estimate": out["resident"] / est["total"]})
    row.update({"weights_GiB": est["weights"] / GIB, "activations_GiB": est["activations"] / GIB,
                "step_s": out["seconds"]})
    print(json.dumps(row), flush=True)
    return row


def _key(row: dict) -> tuple:
    return (*(row[k] for k in ("model", "method", "batch", "seq", "checkpointing")), row.get("dtype", "bfloat16"))


def _with_dtype(row: dict, dtype: str) -> dict:
    """``row`` with a "dtype" entry right after "method"."""
    out = {}
    for k, v in row.items():
        out[k] = v
        if k == "method":
            out["dtype"] = dtype
    return out


def _merge(path, new_rows: list[dict]) -> list[dict]:
    """The rows already in ``path``, replaced or extended by ``new_rows`` (same case, same key)."""
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    old = [r if "dtype" in r else _with_dtype(r, "bfloat16") for r in old]  # rows from before the dtype column
    fresh = {_key(r): r for r in new_rows}
    return [fresh.pop(_key(r), r) for r in old] + list(fresh.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M cases only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", help="run only this model's cases (the other rows of the JSON are kept)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="run only the cases in this dtype")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import RESULTS, write_results

    cases = CUDA_CASES if args.device == "cuda" else QUICK_CASES if args.quick else CPU_CASES
    cases = [c for c in cases if args.model in (None, c[0]) and args.dtype in (None, c[5])]
    name = "memory" if args.device == "cpu" else "memory_cuda"
    rows = _merge(RESULTS / f"{name}.json", [run_case(*case, args.device) for case in cases])
    notes = ("LoRA r=16, alpha=32 on all linear layers (q, k, v, o, gate, up, down), random weights in dtype, "
             "one steady training step. estimate = loralite.estimate_memory(...).total (the peak); allocated = "
             "weights + adapters + optimizer states + the peak of tensors allocated in the step; resident = "
             "peak RSS minus RSS after imports (CPU).")
    write_results(name, rows,
                  meta={"device": args.device, "quick": args.quick}, notes=notes)


if __name__ == "__main__":
    main()
