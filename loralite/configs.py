"""Named model shapes (``config.json`` values only, no weights), and configs read from a path.

The values are those of each model's official Hugging Face ``config.json``: they size memory
estimates (``loralite estimate --model llama-2-7b``) without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from loralite import gguf
from loralite.llama import LlamaConfig

_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
_LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
               num_key_value_heads=8, bos_token_id=128000, eos_token_id=128001)

NAMED_CONFIGS: dict[str, dict] = {
    "llama-2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "llama-2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
    # Llama 1 33B ("llama-30b" on the Hub): the 33B row of the QLoRA paper's memory table
    "llama-33b": dict(_LLAMA2, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52, num_key_value_heads=52, max_position_embeddings=2048,
                      rms_norm_eps=1e-6),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=False),
    "llama-3.1-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=False),
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, head_dim=64, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                         tie_word_embeddings=True),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, head_dim=128, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                         tie_word_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         initializer_range=0.041666666666666664, bos_token_id=0, eos_token_id=0),
}


def load_config(name_or_path) -> LlamaConfig:
    """A ``LlamaConfig`` from a name in ``NAMED_CONFIGS``, an HF folder (its ``config.json``) or a
    ``.gguf`` file (its metadata and tensor table only: no tensor is read or dequantized)."""
    key = str(name_or_path).lower()
    if key in NAMED_CONFIGS:
        return LlamaConfig.from_dict(NAMED_CONFIGS[key], source=key)
    path = Path(name_or_path)
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no config.json in this folder (an HF checkpoint folder has one)")
        return LlamaConfig.from_dict(json.loads(file.read_text()), source=str(file))
    if path.suffix == ".gguf" and path.is_file():
        metadata, tensors = gguf._read_header(path)
        return LlamaConfig.from_dict(gguf.config_from_metadata(metadata, {t.name for t in tensors}, path),
                                     source=str(path))
    raise ValueError(f"{name_or_path!r} is neither a known model ({', '.join(NAMED_CONFIGS)}), "
                     "an HF folder with config.json, nor a .gguf file")
