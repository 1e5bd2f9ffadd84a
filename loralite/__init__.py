"""loralite: LoRA and QLoRA fine-tuning of Llama-family models, from scratch.

    import torch, loralite as ll
    model = ll.load_model("smollm2-135m")
    tok = ll.load_tokenizer("smollm2-135m")
    ll.quantize_model(model, ll.NF4Config())
    ll.add_lora(model, ll.LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"]))
"""

from loralite.adapters import load_adapter, save_adapter
from loralite.configs import load_config
from loralite.generate import generate
from loralite.llama import Llama, LlamaConfig
from loralite.loading import load_model, save_model
from loralite.lora import (
    LoraConfig,
    LoraLinear,
    add_lora,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unmerge,
)
from loralite.memory import MemoryEstimate, estimate_memory
from loralite.optim import AdamW8bit
from loralite.quantize import Linear4bit, NF4Config, quantize_model
from loralite.tokenizer import load_tokenizer
from loralite.train import NonFiniteLossError, TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "AdamW8bit", "Linear4bit", "Llama", "LlamaConfig", "LoraConfig", "LoraLinear", "NF4Config",
    "MemoryEstimate", "NonFiniteLossError", "TrainConfig", "estimate_memory", "load_config", "train",
    "add_lora", "add_weighted_adapter", "delete_adapter", "disable_adapters", "generate",
    "load_adapter", "load_model", "load_tokenizer", "merge", "merge_and_unload",
    "print_trainable_parameters", "quantize_model", "save_adapter", "save_model", "set_adapter",
    "trainable_parameters", "unmerge",
]
