"""Load time and batch-1 decode speed of the default model: loralite vs transformers.

Both read the same GGUF file. Decode speed excludes the prompt: each side generates 1 and
N tokens (greedy, no early stop), and tokens/s = (N - 1) / (t_N - t_1).

At batch 1 a decoded token multiplies a single row through every weight of the model, so it is
bound by memory traffic, not arithmetic. The ceiling row is the tokens/s if a token cost only
reading every linear weight once at the speed of ``torch.sum`` over it (a pure streaming read),
nothing else; both sides are reported as a percentage of it.

    python benchmarks/generate.py [--tokens 64] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from common import time_alternating, write_results
from loralite import load_model, load_tokenizer
from loralite.generate import encode_prompt, generate_ids
from loralite.gguf import resolve_model_path

PROMPT = "Explain in a few sentences what low-rank adaptation of language models is."


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def decoders(ours, hf, prompt: list[int], n: int):
    """One call per side and length, each generating exactly ``n`` tokens."""
    ids = torch.tensor([prompt])

    def loralite_n():
        generate_ids(ours, [prompt], n, stop_ids=set(), pad_id=0)

    def hf_n():
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=0)
    return loralite_n, hf_n


def read_ceiling_tokens_per_s(model, repeats: int) -> float:
    """1 / (seconds to sum every linear weight of ``model``, each read once)."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def read_all():
        for w in weights:
            w.sum()

    return 1 / time_alternating({"read": read_all}, repeats=5 * repeats)["read"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat")
    args = parser.parse_args()
    n, repeats = (16, 1) if args.quick else (args.tokens, args.repeats)

    path = resolve_model_path("smollm2-135m")
    ours, t_ours = timed(lambda: load_model(path))
    hf, t_hf = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval())
    rows = [{"measure": "load (s)", "dtype": "float32", "loralite": t_ours, "transformers": t_hf,
             "ratio (loralite/transformers)": t_ours / t_hf}]
    prompt = encode_prompt(load_tokenizer(path), PROMPT)
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        hf.to(dtype)
        one = time_alternating(dict(zip(("loralite", "hf"), decoders(ours, hf, prompt, 1))), repeats)
        many = time_alternating(dict(zip(("loralite", "hf"), decoders(ours, hf, prompt, n))), repeats)
        tps = {k: (n - 1) / max(many[k] - one[k], 1e-9) for k in one}
        name = str(dtype).removeprefix("torch.")
        rows.append({"measure": "decode (tokens/s, batch 1)", "dtype": name,
                     "loralite": tps["loralite"], "transformers": tps["hf"],
                     "ratio (loralite/transformers)": tps["loralite"] / tps["hf"]})
        ceiling = read_ceiling_tokens_per_s(ours, repeats)
        rows.append({"measure": "decode, % of the read ceiling", "dtype": name,
                     "loralite": 100 * tps["loralite"] / ceiling, "transformers": 100 * tps["hf"] / ceiling,
                     "ratio (loralite/transformers)": tps["loralite"] / tps["hf"]})
        rows.append({"measure": "read ceiling (tokens/s)", "dtype": name, "loralite": ceiling,
                     "transformers": ceiling, "ratio (loralite/transformers)": 1.0})
    write_results("generate", rows, meta={"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> dense)",
                                          "prompt_tokens": len(prompt), "new_tokens": n,
                                          "repeats": repeats},
                  notes="Target: decode at least 1.5x transformers' tokens/s. Load: lower is better. Read "
                        "ceiling: tokens/s if a token cost only one streaming read of every linear weight.")


if __name__ == "__main__":
    main()
