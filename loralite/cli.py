"""The ``loralite`` command: a thin layer over the library functions.

    loralite generate --model smollm2-135m --prompt "What is LoRA?"
    loralite convert model.gguf out_dir/
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cmd_generate(args):
    import loralite as ll

    model = ll.load_model(args.model, dtype=DTYPES[args.dtype])
    tok = ll.load_tokenizer(args.model)
    if args.adapter:
        ll.load_adapter(model, args.adapter)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for prompt in prompts:
        print(f">>> {prompt}", flush=True)
        ll.generate(model, tok, prompt, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, raw=args.raw, stream=lambda s: print(s, end="", flush=True))
        print(flush=True)


def cmd_convert(args):
    import loralite as ll

    model = ll.load_model(args.source, dtype=DTYPES[args.dtype])
    tok = ll.load_tokenizer(args.source)
    ll.save_model(model, args.out_dir, tokenizer=tok)
    print(f"wrote {args.out_dir} ({sum(p.numel() for p in model.parameters()):,} parameters)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loralite", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer prompts, streaming tokens")
    g.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file or 'smollm2-135m'")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per stdin line")
    g.add_argument("--adapter", help="a PEFT-layout adapter folder to apply")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--raw", action="store_true", help="skip the chat template")
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="write a GGUF (or HF) model as an HF checkpoint folder")
    c.add_argument("source", help="a .gguf file, an HF folder or 'smollm2-135m'")
    c.add_argument("out_dir")
    c.add_argument("--dtype", choices=DTYPES, default="float32")
    c.set_defaults(func=cmd_convert)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:
        print(f"loralite {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
