"""Peak memory of loading a Llama-2-7B-shaped checkpoint, dense and quantized while loading.

Writes a random bf16 checkpoint with the real 7B shapes (13.5 GB, one shard per layer, as
``save_pretrained`` shards it), then loads it in fresh subprocesses and reports each one's
peak resident memory (``VmHWM``) next to the size of what it holds:

    python benchmarks/load.py [--layers 32] [--keep] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import write_results
from loralite.llama import LlamaConfig

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_checkpoint(folder: Path, config: LlamaConfig) -> int:
    """Random bf16 weights with the model's shapes, one shard per decoder layer; returns bytes."""
    from loralite.llama import Llama

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Llama(config).state_dict().items()}
    groups: dict[str, dict] = {}
    for key, shape in shapes.items():
        group = key.split(".")[2] if key.startswith("model.layers.") else "rest"
        groups.setdefault(group, {})[key] = shape
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, (group, members) in enumerate(groups.items()):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in members.items()}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: name for k in members})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return total


# Peak RSS from VmHWM: ru_maxrss would carry over the parent's peak across fork + exec.
CHILD = """
import sys, time, torch
import loralite as ll
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
base = hwm()
start = time.perf_counter()
quant = ll.NF4Config() if sys.argv[2] == "nf4" else None
model = ll.load_model(sys.argv[1], dtype=torch.bfloat16, quantize=quant)
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(base, hwm(), held, time.perf_counter() - start)
"""


def measure(folder: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], check=True,
                         capture_output=True, text=True).stdout.split()
    base, peak, held, seconds = int(out[0]), int(out[1]), int(out[2]), float(out[3])
    return {"load": mode, "peak RSS (GB)": peak / 1e9, "after imports (GB)": base / 1e9,
            "model holds (GB)": held / 1e9, "peak - held (GB)": (peak - held) / 1e9, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the real 7B)")
    parser.add_argument("--keep", type=Path, help="write (or reuse) the checkpoint here")
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 32")
    args = parser.parse_args()
    config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": 2 if args.quick else args.layers})
    folder = args.keep or Path(tempfile.mkdtemp(prefix="loralite-7b-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if not (folder / "config.json").exists():
            start = time.perf_counter()
            size = write_checkpoint(folder, config)
            print(f"wrote {size / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s")
        rows = [measure(folder, "nf4"), measure(folder, "dense bf16")]
    finally:
        if args.keep is None:
            shutil.rmtree(folder)
    write_results("load_quick" if args.quick else "load", rows,
                  meta={"shape": f"Llama-2-7B, {config.num_hidden_layers} layers", "dtype": "bfloat16"},
                  notes="Target (issue 3): quantize-while-loading a 7B-shaped checkpoint peaks under 6 GB RSS.")


if __name__ == "__main__":
    main()
