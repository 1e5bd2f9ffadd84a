"""Training-step speed and peak memory: loralite vs transformers + PEFT (+ bitsandbytes for QLoRA).

    python benchmarks/train.py [--quick] [--dtype auto|float32|bfloat16] [--out NAME]

Both sides train the same LoRA (r=16 on q, k, v, o) on SmolLM2-135M-Instruct with the same
batch of random tokens, loss over every token, and AdamW; steps alternate in one process.
QLoRA quantizes every linear but the (tied) output head to NF4 with double quantization
(loralite ``NF4Config`` / ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)``), computing in ``--dtype`` (default ``auto``: what
``loralite.precision`` picks for this CPU; bf16 runs as an autocast of float32 weights on both
sides, and NF4 computes in it).

Achieved FLOP/s counts, per token, what a LoRA step must compute (no weight gradient of
the frozen base):

    4 N_frozen                 forward (2 N) + gradient w.r.t. the input (2 N) of every frozen linear
  + 6 N_lora                   forward, input gradient and weight gradient of the adapters
  + 12 L T D                   attention scores and mixing (4 L T D forward, twice that backward)

with N_frozen the frozen linear weights (output head included), N_lora the adapter weights,
L layers, T the sequence length, D = heads x head_dim. It is reported as a fraction of the
rate of a 1024^3 matmul in the compute dtype, measured in the same run (the yardstick of what
the step could reach on this CPU).
Peak memory is the peak RSS of a fresh subprocess that runs a few steps of one configuration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_bytes, time_alternating, write_results  # noqa: E402

import loralite as ll  # noqa: E402
from loralite import precision  # noqa: E402
from loralite.train import token_loss_sum  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(name: str) -> torch.dtype:
    return precision.auto_dtype("cpu") if name == "auto" else DTYPES[name]


def hf_folder() -> Path:
    """The default model as an HF checkpoint folder (transformers quantizes from safetensors, not GGUF)."""
    folder = Path(tempfile.gettempdir()) / "loralite-bench-smollm2"
    if not (folder / "config.json").is_file():
        ll.save_model(ll.load_model("smollm2-135m"), folder)
    return folder


def loralite_model(quantized: bool, dtype):
    model = ll.load_model(hf_folder(), dtype=torch.float32)
    if quantized:
        ll.quantize_model(model, ll.NF4Config(compute_dtype=dtype))
    torch.manual_seed(0)
    ll.add_lora(model, ll.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    return model.train()


def peft_model(quantized: bool, dtype):
    import peft
    import transformers

    kwargs = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder(), **kwargs)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config).train()


def step_fn(model, batch, kind: str, bf16: bool):
    """One optimizer step: loss = mean token cross-entropy, backward, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    n = batch["labels"][:, 1:].numel()

    def step():
        if kind == "loralite":
            loss = token_loss_sum(model, batch, bf16) / n
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=batch["input_ids"]).logits.float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum") / n
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def flops_per_step(model, batch_size: int, seq: int) -> float:
    """The LoRA step FLOP count of the module docstring."""
    c = model.config
    n_frozen = sum(m.in_features * m.out_features for m in model.modules()
                   if isinstance(m, ll.Linear4bit) or (isinstance(m, torch.nn.Linear) and not m.weight.requires_grad))
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_token = 4 * n_frozen + 6 * n_lora + 12 * c.num_hidden_layers * seq * c.num_attention_heads * c.head_dim
    return per_token * batch_size * seq


def matmul_rate(dtype, n: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` (best of ``repeats``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_batch(batch_size: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (batch_size, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(seq).expand(batch_size, seq)}


def peak_rss(kind: str, quantized: bool, args) -> float:
    """Peak RSS (MiB) of a fresh process running 2 steps of one configuration."""
    cmd = [sys.executable, __file__, "--memory-of", kind, "--batch-size", str(args.batch_size), "--seq",
           str(args.seq), "--dtype", args.dtype] + (["--quantized"] if quantized else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def memory_child(args) -> None:
    dtype = compute_dtype(args.dtype)
    model = (loralite_model if args.memory_of == "loralite" else peft_model)(args.quantized, dtype)
    step = step_fn(model, make_batch(args.batch_size, args.seq), args.memory_of, dtype == torch.bfloat16)
    step()
    step()
    print(json.dumps({"peak_rss_mib": peak_rss_bytes() / 2**20}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: fewer repeats")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="compute dtype (bf16: autocast); auto: loralite.precision's choice for this CPU")
    parser.add_argument("--out", default="train", help="results name: benchmarks/results/OUT.{json,md}")
    parser.add_argument("--memory-of", choices=["loralite", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--quantized", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        return memory_child(args)
    repeats = 2 if args.quick else 5
    dtype = compute_dtype(args.dtype)
    bf16 = dtype == torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    batch = make_batch(args.batch_size, args.seq)
    rate = matmul_rate(dtype)
    # All four steps alternate in one loop, so that drift hits them alike: loralite against its
    # peer, and loralite's QLoRA against its own LoRA.
    configs = (("LoRA", False), ("QLoRA", True))
    models = {(name, kind): (loralite_model if kind == "loralite" else peft_model)(quantized, dtype)
              for name, quantized in configs for kind in ("loralite", "peft")}
    times = time_alternating({key: step_fn(model, batch, key[1], bf16) for key, model in models.items()},
                             repeats=repeats)
    tokens = args.batch_size * args.seq
    rows = []
    for name, quantized in configs:
        ours, theirs = times[(name, "loralite")], times[(name, "peft")]
        flops = flops_per_step(models[(name, "loralite")], args.batch_size, args.seq)
        rows.append({
            "config": name, "compute": dtype_name,
            "loralite s/step (median)": ours, "loralite min-max": ours.spread,
            "peer s/step (median)": theirs, "peer min-max": theirs.spread,
            "loralite / peer (target <= 0.7)": ours / theirs,
            "loralite / its LoRA step": ours / times[("LoRA", "loralite")],
            "loralite tok/s": tokens / ours, "peer tok/s": tokens / theirs,
            "loralite GFLOP/s": flops / ours / 1e9,
            f"% of the {dtype_name} matmul rate": 100 * flops / ours / rate})
    del models
    for row, (name, quantized) in zip(rows, configs):  # each in a fresh process, after the timing
        row["loralite peak RSS MiB"] = peak_rss("loralite", quantized, args)
        row["peer peak RSS MiB"] = peak_rss("peft", quantized, args)
    lora, qlora = rows[0]["loralite s/step (median)"], rows[1]["loralite s/step (median)"]
    notes = (f"batch {args.batch_size} x {args.seq} tokens, compute {dtype_name} (--dtype {args.dtype}), r=16 on "
             f"{TARGETS}, AdamW; medians of {repeats} rounds of the four steps in turns. loralite QLoRA / LoRA step: "
             f"{qlora / lora:.2f}. {dtype_name} 1024^3 matmul in this run: {rate / 1e9:.1f} GFLOP/s. "
             "Peer: transformers + PEFT (+ bitsandbytes NF4 with double quant for QLoRA).")
    write_results(args.out, rows, meta={"batch_size": args.batch_size, "seq": args.seq, "dtype": dtype_name,
                                        "repeats": repeats}, notes=notes)


if __name__ == "__main__":
    main()
