"""LoRA training step on CPU: loralite vs PEFT (over transformers' Llama), side by side in one process.

Two workloads, each a forward + backward with the same LoRA config, weights and batch:
  * one decoder layer of the default model (SmolLM2-135M: hidden 576, 9/3 heads, MLP 1536);
  * the whole default model (``loralite.load_model("smollm2-135m")``, 30 layers, vocab 49152),
    with the same weights copied into ``transformers.LlamaForCausalLM`` (identical state-dict keys),
    each with its library's training loss: ``model(ids, labels=ids)`` (loralite's output head fused
    with the cross-entropy, a chunk of tokens at a time) and ``model(input_ids=ids, labels=ids).loss``
    (transformers: full float32 logits, then the cross-entropy).
Runs alternate (loralite, PEFT, loralite, ...) so that load on the shared machine hits both alike;
the figures are the median time per step with its min-max, and the ratio of the medians
loralite / PEFT (target: <= 0.8). The result files record the CPU's model and SIMD features.

    python benchmarks/lora.py [--quick] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import loralite.lora as ll
from common import RESULTS, Timing, write_results
from loralite.llama import Llama, rope_frequencies
from loralite.loading import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_pair(ours: Llama, r: int, alpha: int, dropout: float):
    """``ours`` with loralite LoRA, and a transformers copy of it with PEFT LoRA (equal adapter weights)."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ours.config.to_dict()))
    hf.load_state_dict(ours.state_dict())
    hf.config._attn_implementation = "sdpa"
    peft_model = get_peft_model(hf, PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                   target_modules=TARGETS, task_type="CAUSAL_LM"))
    ll.add_lora(ours, ll.LoraConfig(r=r, alpha=alpha, dropout=dropout, target_modules=TARGETS))
    theirs = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items()}
    ours.load_state_dict(theirs)
    return ours.train(), peft_model.train()


def layer_steps(ours: Llama, peft_model, batch: int, seq: int):
    """Forward + backward closures for decoder layer 0 of each model, on the same hidden states."""
    x = torch.randn(batch, seq, ours.config.hidden_size, requires_grad=True)
    angles = torch.arange(seq)[:, None].float() * rope_frequencies(ours.config, seq)  # (T, hd/2)
    angles = torch.cat((angles, angles), -1)  # (T, hd)
    cos, sin = angles.cos()[None], angles.sin()[None]  # (1, T, hd)
    ours_layer = ours.model.layers[0]
    hf = peft_model.base_model.model.model
    position_ids = torch.arange(seq)[None].expand(batch, seq)
    hf_cos_sin = hf.rotary_emb(x, position_ids)  # ((B, T, hd), (B, T, hd))

    def ours_step():
        ours_layer(x, cos, sin, None).sum().backward()

    def peft_step():
        out = hf.layers[0](x, attention_mask=None, position_ids=position_ids, position_embeddings=hf_cos_sin)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    return ours_step, peft_step


def model_steps(ours: Llama, peft_model, batch: int, seq: int):
    """A training step's forward + backward, each through its library's own next-token loss:
    loralite's fused head + cross-entropy (``labels=``), transformers' ``labels=`` loss over full logits."""
    ids = torch.randint(0, ours.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def ours_step():
        ours(ids, labels=ids).backward()

    def peft_step():
        peft_model(input_ids=ids, labels=ids).loss.backward()

    return ours_step, peft_step


def time_alternating(ours_step, peft_step, models, repeats: int, warmup: int = 2) -> dict[str, Timing]:
    """Seconds per step of each side, steps alternating. Gradients are set to None before every step,
    so each backward allocates fresh ones, as a training step after ``zero_grad()`` does."""
    times = {"loralite": [], "peft": []}
    for i in range(warmup + repeats):
        for name, step in (("loralite", ours_step), ("peft", peft_step)):
            for m in models:
                m.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: Timing(samples) for name, samples in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="folder for lora.json and lora.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    r, alpha, dropout = 16, 32, 0.05
    layer_shape, model_shape, repeats = ((4, 256), (2, 128), 7) if not args.quick else ((2, 128), (1, 64), 3)
    ours, peft_model = lora_pair(load_model("smollm2-135m"), r, alpha, dropout)
    rows = []
    for label, make, (b, t) in (("decoder layer", layer_steps, layer_shape), ("whole model", model_steps,
                                                                                model_shape)):
        times = time_alternating(*make(ours, peft_model, b, t), (ours, peft_model), repeats)
        ours_ms, peft_ms = times["loralite"].scaled(1e3), times["peft"].scaled(1e3)
        rows.append({"workload": label, "batch": b, "seq": t,
                     "loralite ms/step (median)": ours_ms, "loralite ms/step (min-max)": ours_ms.spread,
                     "PEFT ms/step (median)": peft_ms, "PEFT ms/step (min-max)": peft_ms.spread,
                     "loralite / PEFT (medians, target <= 0.8)": ours_ms / peft_ms})
    config = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": TARGETS, "dtype": "float32"}
    write_results("lora", rows, folder=args.out_dir,
                  meta={"config": config, "repeats": repeats, "warmup": 2, "quick": args.quick},
                  notes=f"Forward + backward, fp32, CPU ({torch.get_num_threads()} threads), LoRA r={r}, "
                        f"alpha={alpha}, dropout={dropout} on {', '.join(TARGETS)}; median and min-max of "
                        f"{repeats} alternating runs after 2 warm-up runs each. Target: <= 0.8.")


if __name__ == "__main__":
    main()
