"""The ``loralite`` command: a thin layer over the library functions.

    loralite generate --model smollm2-135m --prompt "What is LoRA?"
    loralite convert model.gguf out_dir/
    loralite train --model smollm2-135m --data examples/persona.jsonl --qlora --max-steps 60 --output-dir out
    loralite merge --model smollm2-135m --adapter out/adapter --out merged/
    loralite estimate --model llama-2-7b --qlora --seq-len 512
"""

from __future__ import annotations

import argparse
import sys

import torch

from loralite.optim import OPTIMIZERS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --dtype of the commands that compute: "auto" is loralite.precision's choice for the device.
COMPUTE_DTYPES = ("auto", *DTYPES)
# train's --dtype: the autocast of TrainConfig.bf16 (float16 autocast is not offered).
TRAIN_DTYPES = {"auto": "auto", "float32": False, "bfloat16": True}


def _dtype(name: str, device: str = "cpu") -> torch.dtype:
    """``DTYPES[name]``, or for "auto" the fast compute dtype of ``device``."""
    from loralite import precision

    return precision.auto_dtype(device) if name == "auto" else DTYPES[name]


def _device(args) -> str:
    """--device, by default CUDA where torch sees a GPU, else the CPU; a bad one is a ValueError."""
    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu, or install "
                         "torch's CUDA build on a machine with a GPU")
    return args.device


def _add_device(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--device", help=f"where {what} (cpu, cuda, cuda:1, ...); default: cuda when available")


def cmd_generate(args):
    import loralite as ll

    device = _device(args)
    model = ll.load_model(args.model, dtype=_dtype(args.dtype, device), device=device)
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

    model = ll.load_model(args.source, dtype=DTYPES[args.dtype], device=_device(args))
    tok = ll.load_tokenizer(args.source)
    ll.save_model(model, args.out_dir, tokenizer=tok)
    print(f"wrote {args.out_dir} ({sum(p.numel() for p in model.parameters()):,} parameters)")


def cmd_quantize(args):
    import loralite as ll

    config = ll.NF4Config(quant_type=args.quant_type, double_quant=not args.no_double_quant,
                          compute_dtype=DTYPES[args.compute_dtype])
    model = ll.load_model(args.source, dtype=DTYPES[args.dtype], device=_device(args), quantize=config)
    tok = ll.load_tokenizer(args.source)
    ll.save_model(model, args.out_dir, tokenizer=tok)
    print(f"wrote {args.out_dir} (bitsandbytes 4-bit layout, {args.quant_type}, "
          f"double quantization {'off' if args.no_double_quant else 'on'})")


# TrainConfig fields that have their own command-line flag (flag name: field name)
TRAIN_FLAGS = {"max_steps": int, "num_train_epochs": float, "per_device_train_batch_size": int,
               "gradient_accumulation_steps": int, "learning_rate": float, "lr_scheduler_type": str,
               "warmup_steps": int, "max_seq_length": int, "save_steps": int, "logging_steps": int, "seed": int,
               "optim": str}


def cmd_train(args):
    """Load (and quantize), add LoRA, train, and write ``output_dir/adapter``; under torchrun, one rank each."""
    import json
    import os
    from pathlib import Path

    import loralite as ll
    from loralite.train import TrainConfig, autocasts_bf16, train

    options = {}
    if args.config:
        try:
            options = json.loads(Path(args.config).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {args.config}: not valid JSON ({e})") from None
    options.update({k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None})
    options.update({k: True for k in ("gradient_checkpointing", "packing") if getattr(args, k)})
    if args.bf16 or args.dtype is not None:
        options["bf16"] = TRAIN_DTYPES["bfloat16" if args.bf16 else args.dtype]
    options["output_dir"] = args.output_dir
    if args.resume:
        options["resume_from_checkpoint"] = True
    config = TrainConfig.from_dict(options, source=args.config or "command line")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _device(args)
    if distributed:
        cuda = torch.device(device).type == "cuda"
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:  # one GPU per rank
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    try:
        bf16 = autocasts_bf16(config.bf16, device)
        # --qlora quantizes each linear as it is read, so the dense base never exists whole (a 7B
        # in float32 would be 27 GB); the other weights load in float32, the adapters train in it
        quant = ll.NF4Config(compute_dtype=torch.bfloat16 if bf16 else torch.float32) if args.qlora else None
        model = ll.load_model(args.model, dtype=torch.float32, device=device, quantize=quant)
        tok = ll.load_tokenizer(args.model)
        torch.manual_seed(config.seed)  # the same adapter initialisation on every rank
        ll.add_lora(model, _lora_config(args, alpha=args.alpha))
        history = train(model, tok, args.data, config)
        if not distributed or torch.distributed.get_rank() == 0:
            path = ll.save_adapter(model, os.path.join(args.output_dir, "adapter"),
                                   base_model_name_or_path=str(args.model))
            print(f"final loss {history[-1]['loss']:.4f} after {len(history)} steps; adapter written to {path}")
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _lora_config(args, alpha: float | None = None):
    """``LoraConfig`` from the --r, --dropout and --target-modules flags; alpha defaults to 2 r."""
    from loralite.lora import LoraConfig

    targets = "all-linear" if args.target_modules == ["all-linear"] else args.target_modules
    return LoraConfig(r=args.r, alpha=alpha if alpha else 2 * args.r, dropout=args.dropout, target_modules=targets)


def cmd_merge(args):
    import loralite as ll

    model = ll.load_model(args.model, dtype=DTYPES[args.dtype], device=_device(args))
    tok = ll.load_tokenizer(args.model)
    ll.load_adapter(model, args.adapter)
    ll.save_model(ll.merge_and_unload(model), args.out, tokenizer=tok)
    print(f"wrote {args.out}: {args.model} with {args.adapter} merged in")


def cmd_estimate(args):
    import json

    import loralite as ll
    from loralite.configs import load_config
    from loralite.memory import estimate_memory

    est = estimate_memory(load_config(args.model), lora=_lora_config(args),
                          quant=ll.NF4Config() if args.qlora else None,
                          batch_size=args.batch_size, seq_len=args.seq_len,
                          gradient_checkpointing=args.gradient_checkpointing, optim=args.optim,
                          dtype=DTYPES[args.dtype], device=args.device)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return
    print(f"{args.model}: {'QLoRA (NF4)' if args.qlora else 'LoRA'} r={args.r} on {' '.join(args.target_modules)}, "
          f"batch {args.batch_size} x {args.seq_len} tokens, {args.optim}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print(est.table())


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
    g.add_argument("--dtype", choices=COMPUTE_DTYPES, default="auto",
                   help="dtype of the weights and the compute; auto: bfloat16 on CUDA and on CPUs with bf16 units "
                        "(AVX512-BF16, AMX) where it measures faster, float32 elsewhere")
    _add_device(g, "the model runs")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="write a GGUF (or HF) model as an HF checkpoint folder")
    c.add_argument("source", help="a .gguf file, an HF folder or 'smollm2-135m'")
    c.add_argument("out_dir")
    c.add_argument("--dtype", choices=DTYPES, default="float32")
    _add_device(c, "the weights are loaded")
    c.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="write a model as a bitsandbytes 4-bit HF folder (NF4/FP4)")
    q.add_argument("source", help="an HF folder, a .gguf file or 'smollm2-135m'")
    q.add_argument("out_dir")
    q.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    q.add_argument("--no-double-quant", action="store_true", help="keep the block scales in float32")
    q.add_argument("--compute-dtype", choices=DTYPES, default="bfloat16")
    q.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the unquantized weights")
    _add_device(q, "the weights are quantized")
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("train", help="fine-tune a LoRA (or QLoRA) adapter; works under torchrun")
    t.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file or 'smollm2-135m'")
    t.add_argument("--data", required=True, help="a .jsonl/.json file of messages, prompt/completion or text rows")
    t.add_argument("--output-dir", required=True, help="checkpoints, metrics and the final adapter/ go here")
    t.add_argument("--config", help="a JSON file of TrainConfig options (the flags below override it)")
    t.add_argument("--qlora", action="store_true", help="quantize the frozen base to NF4 first")
    t.add_argument("--r", "--lora-r", type=int, default=16, dest="r",
                   help="LoRA rank (spell it --lora-r under torchrun, whose parser takes --r for its own options)")
    t.add_argument("--alpha", type=float, help="LoRA alpha (default 2 * r)")
    t.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    t.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="linears to adapt, by name, or all-linear")
    for name, kind in TRAIN_FLAGS.items():
        t.add_argument("--" + name.replace("_", "-"), type=kind, dest=name)
    t.add_argument("--bf16", action="store_true", help="the same as --dtype bfloat16")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--packing", action="store_true")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    t.add_argument("--dtype", choices=TRAIN_DTYPES,
                   help="compute dtype (default auto: bfloat16 on CUDA and on CPUs with bf16 units where it measures "
                        "faster, float32 elsewhere); bfloat16 autocasts float32 weights, as TrainConfig.bf16 does")
    _add_device(t, "the model trains (under torchrun, CUDA means one GPU per rank)")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("merge", help="fold an adapter into its base and write an HF checkpoint folder")
    m.add_argument("--model", default="smollm2-135m", help="the base the adapter was trained on")
    m.add_argument("--adapter", required=True, help="a PEFT-layout adapter folder")
    m.add_argument("--out", required=True, help="output folder (config.json, model.safetensors, tokenizer)")
    m.add_argument("--dtype", choices=DTYPES, default="float32")
    _add_device(m, "the adapter is merged")
    m.set_defaults(func=cmd_merge)

    e = sub.add_parser("estimate", help="memory of a LoRA/QLoRA training step, by part")
    e.add_argument("--model", required=True, help="a named config (llama-2-7b, ...), an HF folder or a .gguf file")
    e.add_argument("--qlora", action="store_true", help="frozen linears in NF4 with double quantization")
    e.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    e.add_argument("--target-modules", nargs="+", default=["all-linear"], help="module names, or all-linear")
    e.add_argument("--dropout", type=float, default=0.0)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--gradient-checkpointing", action="store_true")
    e.add_argument("--optim", choices=OPTIMIZERS, default="adamw")
    e.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    e.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the step would run")
    e.add_argument("--json", action="store_true", help="print the numbers as JSON")
    e.set_defaults(func=cmd_estimate)
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
