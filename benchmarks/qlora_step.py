"""A QLoRA step and batch-1 decode on a random-weight Llama shape: loralite vs transformers + PEFT
(+ bitsandbytes), side by side in one process. Built for the GPU suite (a 7B shape on one GPU,
no model files: random weights), it runs on CPU too with a small shape.

    python benchmarks/qlora_step.py --device cuda --shape llama-2-7b [--seq 512] [--cap-gb 24]
    python benchmarks/qlora_step.py --device cpu --shape tiny          # a smoke run

Both sides: bf16 weights, every linear but the output head in NF4 with double quantization
(blocksize 64), LoRA r=16, alpha=32 on all seven linears of each block with float32 adapters,
bf16 autocast, AdamW, batch 1 x ``--seq`` random tokens, each side through its own training loss
(``labels=``). Reported: median step time (and min-max), tokens/s, the peak of allocated memory of a
step (CUDA) and decode tokens/s of the QLoRA model (32 new tokens after a 32-token prompt). With
``--cap-gb``, the process may allocate at most that much (``set_per_process_memory_fraction``),
as on a 24 GB card. A peer that is not installed (bitsandbytes, PEFT) is reported as absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Timing, time_alternating, write_results  # noqa: E402

import loralite as ll  # noqa: E402
from loralite import nf4  # noqa: E402
from loralite.configs import load_config  # noqa: E402
from loralite.generate import generate_ids  # noqa: E402
from loralite.train import token_loss_sum  # noqa: E402

SHAPES = {"tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ABSENT = "absent (not installed)"


def model_config(shape: str) -> ll.LlamaConfig:
    return ll.LlamaConfig(**SHAPES[shape]) if shape in SHAPES else load_config(shape)


def _random_(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)


def _float32_adapters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


QUANT = ll.NF4Config(compute_dtype=torch.bfloat16)
LORA = ll.LoraConfig(r=16, alpha=32, target_modules=TARGETS)


def loralite_model(config: ll.LlamaConfig, device: str) -> torch.nn.Module:
    """Built on meta, each linear made random and quantized on the device one at a time (a 13B never
    exists dense), then the rest (embeddings, norms, head) made random in bf16."""
    with torch.device("meta"):
        model = ll.Llama(config).to(torch.bfloat16)
    model.requires_grad_(False)
    generator = torch.Generator(device).manual_seed(0)

    def make(name, linear):
        w = torch.randn(linear.weight.shape, generator=generator, device=device, dtype=torch.bfloat16) * 0.02
        return ll.Linear4bit(nf4.quantize(w, QUANT.blocksize, QUANT.double_quant), None, QUANT.compute_dtype)

    ll.quantize_model(model, QUANT, make=make)
    model = model.to_empty(device=device)
    _random_(model)
    model.tie_weights()
    ll.add_lora(model, LORA)
    _float32_adapters(model)
    return model.train()


def peer_model(config: ll.LlamaConfig, device: str) -> torch.nn.Module | str:
    """transformers' Llama with bitsandbytes' Linear4bit layers and PEFT's LoRA, or why not."""
    if importlib.util.find_spec("bitsandbytes") is None or importlib.util.find_spec("peft") is None:
        return ABSENT
    import bitsandbytes as bnb
    import peft
    import transformers

    hf_config = transformers.LlamaConfig(**config.to_dict())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: no float32 copy of a 7B
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_config)  # its own random init, RoPE tables included
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):  # bitsandbytes quantizes on the move to the device
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            # from the bf16 weight, so that bitsandbytes dequantizes to bf16 as loralite does
            layer.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
            if module.bias is not None:
                layer.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to(device))
    model = model.to(device)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    _float32_adapters(model)
    return model.train()


def step_fn(model, ids: torch.Tensor, ours: bool):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(ids.shape[1], device=ids.device)[None]}
    n = ids.shape[1] - 1

    def step():
        if ours:
            loss = token_loss_sum(model, batch, True) / n
        else:
            with torch.autocast(ids.device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_bytes(step, device: str) -> int | str:
    """Peak of allocated memory during one step (CUDA; on CPU not measured here)."""
    if device != "cuda":
        return "-"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def decode_rate(model, ours: bool, vocab: int, device: str, new: int = 32) -> float:
    prompt = torch.randint(3, vocab, (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    model.eval()
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        def run(n):
            if ours:
                generate_ids(model, [prompt[0].tolist()], n, stop_ids=set(), pad_id=0)
            else:
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)
        times = time_alternating({"1": lambda: run(1), "n": lambda: run(new)}, repeats=3, device=device)
    model.train()
    return (new - 1) / max(times["n"] - times["1"], 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="llama-2-7b", help="tiny, or a named config (llama-2-7b, ...)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cap-gb", type=float, help="allow at most this much GPU memory (a 24 GB card: 24)")
    parser.add_argument("--quick", action="store_true", help="3 repeats of 256 tokens")
    parser.add_argument("--no-peer", action="store_true", help="loralite alone (e.g. a 13B under a 24 GB cap)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.seq = 3, min(args.seq, 256)
    if args.cap_gb and args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 1e9 / total))
    config = model_config(args.shape)
    ids = torch.randint(3, config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    start = time.perf_counter()
    ours = loralite_model(config, args.device)
    built = {"loralite": time.perf_counter() - start}
    steps = {"loralite": step_fn(ours, ids, True)}
    start = time.perf_counter()
    peer = "not run (--no-peer)" if args.no_peer else peer_model(config, args.device)
    built["peer"] = time.perf_counter() - start
    if not isinstance(peer, str):
        steps["peer"] = step_fn(peer, ids, False)
    peaks = {name: peak_bytes(step, args.device) for name, step in steps.items()}  # also the warm-up
    times = time_alternating(steps, repeats=args.repeats, warmup=1, device=args.device)
    estimate = ll.estimate_memory(config, LORA, QUANT, batch_size=1, seq_len=args.seq, dtype=torch.bfloat16,
                                  device="cuda" if args.device == "cuda" else "cpu").total
    rows = []
    for name, model in (("loralite", ours), ("peer", peer)):
        if isinstance(model, str):
            rows.append({"side": "transformers + PEFT + bitsandbytes", "step s (median)": model})
            continue
        t: Timing = times[name]
        peak = peaks[name]
        rows.append({"side": "loralite" if name == "loralite" else "transformers + PEFT + bitsandbytes",
                     "step s (median)": t, "step s (min-max)": t.spread, "tokens/s": args.seq / t,
                     "step / loralite's": t / times["loralite"],
                     "peak allocated GB": peak / 1e9 if isinstance(peak, int) else peak,
                     "loralite's estimate_memory GB": estimate / 1e9 if name == "loralite" else "-",
                     "decode tokens/s": decode_rate(model, name == "loralite", config.vocab_size, args.device),
                     "build s": built[name]})
    notes = (f"{args.shape} shape, random weights, batch 1 x {args.seq} tokens, NF4 (double quant) on every linear "
             f"but lm_head, LoRA r=16 on {', '.join(TARGETS)}, bf16 autocast, AdamW; median of {args.repeats} "
             f"alternating steps" + (f"; memory capped at {args.cap_gb} GB" if args.cap_gb else "") + ".")
    write_results(f"qlora_step_{args.shape}_{args.device}", rows, meta={"shape": args.shape, "seq": args.seq,
                                                            "device": args.device, "cap_gb": args.cap_gb},
                  notes=notes, folder=args.out_dir)


if __name__ == "__main__":
    main()
