"""Print the base model's and the fine-tuned model's answers to held-out prompts, side by side.

    python examples/compare.py --adapter runs/persona/adapter --prompts examples/persona_eval.jsonl

The base answers come from the model as shipped. The fine-tuned model is the NF4 base the
adapter was trained on (QLoRA) with the adapter merged in (``merge_and_unload``: dequantize,
add ``s · B A``), so generation runs on dense weights instead of dequantizing every layer
at every token. Both run in the compute dtype ``"auto"`` picks for this CPU (bf16 where it has
bf16 units and measures faster, float32 elsewhere).
"""

import argparse
import json

import loralite as ll
from loralite import precision


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", required=True, help="the trained adapter folder")
    parser.add_argument("--prompts", required=True, help="a .jsonl of {'messages': [...]} rows without answers")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    tok = ll.load_tokenizer(args.model)
    conversations = [json.loads(line)["messages"] for line in open(args.prompts) if line.strip()]
    dtype = precision.auto_dtype("cpu")
    base = ll.generate(ll.load_model(args.model, dtype=dtype), tok, conversations, max_new_tokens=args.max_new_tokens)
    qlora = ll.load_model(args.model, dtype=dtype, quantize=ll.NF4Config(compute_dtype=dtype))
    tuned_model = ll.merge_and_unload(ll.load_adapter(qlora, args.adapter))
    tuned = ll.generate(tuned_model, tok, conversations, max_new_tokens=args.max_new_tokens)
    for messages, before, after in zip(conversations, base, tuned):
        print(f"\n>>> {messages[-1]['content']}")
        print(f"  base:       {before.strip()}")
        print(f"  fine-tuned: {after.strip()}")


if __name__ == "__main__":
    main()
