"""Load time and batch-1 decode speed of the default model: loralite vs transformers.

Both read the same GGUF file. Decode speed excludes the prompt: each side generates 1 and
N tokens (greedy, no early stop), and tokens/s = (N - 1) / (t_N - t_1), with t_1 and t_N from
the same round of alternating runs; reported: the median over rounds and its min-max.

At batch 1 a decoded token multiplies a single row through every weight of the model, so it is
bound by memory traffic, not arithmetic. The ceiling row is the tokens/s if a token cost only
reading every linear weight once at the speed of ``torch.sum`` over it (a pure streaming read),
nothing else; both sides are reported as a percentage of it.

    python benchmarks/generate.py [--tokens 64] [--repeats 3] [--quick] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from common import RESULTS, Timing, time_alternating, write_results
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


def decode_tokens_per_s(ours, hf, prompt: list[int], n: int, repeats: int) -> dict[str, Timing]:
    """Tokens/s of each side, one sample per round: (n - 1) / (t_n - t_1) of that round's runs."""
    fns = {}
    for length in (1, n):
        fns.update(zip((f"loralite {length}", f"hf {length}"), decoders(ours, hf, prompt, length)))
    times = time_alternating(fns, repeats)
    return {side: Timing([(n - 1) / max(t_n - t_1, 1e-9)
                          for t_1, t_n in zip(times[f"{side} 1"].samples, times[f"{side} {n}"].samples)])
            for side in ("loralite", "hf")}


def read_ceiling_tokens_per_s(model, repeats: int) -> Timing:
    """1 / (seconds to sum every linear weight of ``model``, each read once), per timed read."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def read_all():
        for w in weights:
            w.sum()

    seconds = time_alternating({"read": read_all}, repeats=5 * repeats)["read"]
    return Timing([1 / s for s in seconds.samples])


def row(measure: str, dtype: str, ours, theirs, ratio: float) -> dict:
    """One measure of both sides: each a ``Timing`` (median and min-max) or a single figure."""
    def spread(value):
        return value.spread if isinstance(value, Timing) else "-"

    return {"measure": measure, "dtype": dtype, "loralite (median)": ours, "loralite min-max": spread(ours),
            "transformers (median)": theirs, "transformers min-max": spread(theirs),
            "loralite / transformers (medians)": ratio}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat")
    parser.add_argument("--out-dir", type=Path, default=RESULTS,
                        help="folder for generate.json and generate.md")
    args = parser.parse_args()
    n, repeats = (16, 1) if args.quick else (args.tokens, args.repeats)

    path = resolve_model_path("smollm2-135m")
    ours, t_ours = timed(lambda: load_model(path))
    hf, t_hf = timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval())
    rows = [row("load (s, one run each)", "float32", t_ours, t_hf, t_ours / t_hf)]
    prompt = encode_prompt(load_tokenizer(path), PROMPT)
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype)
        hf.to(dtype)
        tps = decode_tokens_per_s(ours, hf, prompt, n, repeats)
        ceiling = read_ceiling_tokens_per_s(ours, repeats)
        name = str(dtype).removeprefix("torch.")
        ratio = tps["loralite"] / tps["hf"]
        rows.append(row("decode (tokens/s, batch 1)", name, tps["loralite"], tps["hf"], ratio))
        rows.append(row("decode (% of the read ceiling, of the medians)", name,
                        100 * tps["loralite"] / ceiling, 100 * tps["hf"] / ceiling, ratio))
        rows.append(row("read ceiling (tokens/s; one figure for both)", name, ceiling, ceiling, 1.0))
    write_results("generate", rows, folder=args.out_dir,
                  meta={"model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> dense)", "prompt_tokens": len(prompt),
                        "new_tokens": n, "repeats": repeats},
                  notes=f"Decode: median and min-max over {repeats} round(s) of alternating runs (after a "
                        "warm-up), one tokens/s figure per round. Target: decode at least 1.5x "
                        "transformers' tokens/s. Load: lower is better, timed once per side. Read ceiling: "
                        "tokens/s if a token cost only one streaming read of every linear weight (median "
                        f"and min-max of {5 * repeats} reads).")

if __name__ == "__main__":
    main()
