"""Print the base model's and the fine-tuned model's answers to held-out prompts, side by side.

    python examples/compare.py --adapter runs/persona/adapter --prompts examples/persona_eval.jsonl

The base is quantized to NF4 as in training (QLoRA), the adapter loaded on top; the base
answers come from the same model with the adapter switched off (``disable_adapters``).
"""

import argparse
import json

import torch

import loralite as ll


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", required=True, help="the trained adapter folder")
    parser.add_argument("--prompts", required=True, help="a .jsonl of {'messages': [...]} rows without answers")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    model = ll.load_model(args.model)
    tok = ll.load_tokenizer(args.model)
    ll.quantize_model(model, ll.NF4Config(compute_dtype=torch.float32))
    ll.load_adapter(model, args.adapter)
    conversations = [json.loads(line)["messages"] for line in open(args.prompts) if line.strip()]
    with ll.disable_adapters(model):
        base = ll.generate(model, tok, conversations, max_new_tokens=args.max_new_tokens)
    tuned = ll.generate(model, tok, conversations, max_new_tokens=args.max_new_tokens)
    for messages, before, after in zip(conversations, base, tuned):
        print(f"\n>>> {messages[-1]['content']}")
        print(f"  base:       {before.strip()}")
        print(f"  fine-tuned: {after.strip()}")


if __name__ == "__main__":
    main()
