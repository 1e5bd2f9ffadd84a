"""Checkpoints in and out: Hugging Face folders (safetensors, sharded) and GGUF files.

Loading follows gpt-fast: build the model on the meta device (no memory, no init), read
the memory-mapped tensors, check every key and shape, then ``load_state_dict(assign=True)``
so the checkpoint's tensors become the parameters without a second copy.

Pickled checkpoints (``.bin``, ``.pt``) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import struct
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from loralite import gguf, nf4, precision
from loralite.files import atomic_write_bytes, atomic_write_json
from loralite.llama import Llama, LlamaConfig
from loralite.quantize import Linear4bit, NF4Config, quantize_model

# Safetensors dtype names -> torch dtypes (and so bytes per element, for the header checks).
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                 "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                 "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
_DTYPE_SIZES = {name: dtype.itemsize for name, dtype in _TORCH_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header, in bytes
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it is; the message names the file and key."""


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header without trusting it.

    Layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name
    to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (relative to the end of the
    header), then the data. Checks: N inside the file, offsets inside the data, sizes
    matching dtype and shape, no two tensors overlapping.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file "
                                  f"({size} bytes); the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            itemsize = _DTYPE_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} has a malformed header entry {info!r}") from None
        if not 0 <= begin <= end <= size - 8 - n:
            raise CheckpointError(f"{path}: tensor {key!r} spans bytes {begin}..{end}, past the end "
                                  f"of the data ({size - 8 - n} bytes); the file is truncated")
        if end - begin != numel * itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} holds {end - begin} bytes but its shape "
                                  f"{info['shape']} and dtype {info['dtype']} need {numel * itemsize}")
        spans.append((begin, end, key))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
        if begin_b > end_a:
            raise CheckpointError(f"{path}: bytes {end_a}..{begin_b} before tensor {b!r} belong "
                                  "to no tensor; the header does not describe this file")
    return header


def _checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder, through the shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid shard index (needs a 'weight_map')") from None
        files = sorted({folder / name for name in weight_map.values()})
        for f in files:
            if not f.exists():
                raise OSError(f"{index} names shard {f.name}, which is missing from {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickled weights ({', '.join(pickles)}) were found; loralite never "
            "unpickles files (it can run arbitrary code). Convert them to safetensors first.")
    raise OSError(f"{folder}: no *.safetensors weights found")


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise OSError(f"{folder}: config.json is missing; an HF checkpoint folder needs one")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def iter_safetensors(files: list[Path]):
    """Yield (key, tensor, file) for every tensor of every file: views into a memory map.

    The map is private (copy-on-write), so the tensors are writable and the file is never
    changed. Once the consumer has moved on to the next tensor, the pages under the previous
    one are handed back to the OS (``MADV_DONTNEED``); a view that was kept reads them from
    the file again when touched. Reading a checkpoint therefore holds about one tensor of it
    in resident memory at a time, which is what keeps quantize-while-loading small.
    """
    page = mmap.PAGESIZE
    for path in files:
        header = read_safetensors_header(path)
        with open(path, "rb") as f:
            start = 8 + struct.unpack("<Q", f.read(8))[0]
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
            begin, end = (start + o for o in info["data_offsets"])
            dtype = _TORCH_DTYPES[info["dtype"]]
            if end == begin:
                t = torch.empty(info["shape"], dtype=dtype)
            else:
                t = torch.frombuffer(mm, dtype=dtype, count=(end - begin) // _DTYPE_SIZES[info["dtype"]],
                                     offset=begin).view(info["shape"])
            yield key, t, path
            del t
            lo, hi = -(-begin // page) * page, end // page * page  # whole pages inside the tensor
            if hi > lo:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def expected_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}


def _quantized_owner(model: torch.nn.Module, key: str) -> Linear4bit | None:
    """The ``Linear4bit`` that ``key`` ("...q_proj.weight" / ".bias") belongs to, if any."""
    owner, _, _ = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return module if isinstance(module, Linear4bit) else None


def assign_checked(model: Llama, tensors, dtype, device, source: str, quant: NF4Config | None = None):
    """Check every key and shape against ``model`` (on meta), then assign them in place.

    ``tensors`` yields (key, tensor, file); a tied ``lm_head.weight`` may be absent. With
    ``quant``, each linear's weight is quantized as soon as it is read and its dense copy
    dropped, so peak memory stays near the 4-bit size of the model.
    """
    want = expected_shapes(model)
    if quant is not None:
        quantize_model(model, quant)  # on meta: Linear4bit shells, filled below
    got = {}
    for key, t, path in tensors:
        if key not in want:
            raise CheckpointError(f"{path}: unexpected key {key!r} for this Llama config "
                                  "(another architecture, or a config.json that does not match)")
        if t.shape != want[key]:
            raise CheckpointError(f"{path}: {key!r} has shape {tuple(t.shape)}, the config "
                                  f"needs {tuple(want[key])}")
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        layer = _quantized_owner(model, key) if quant is not None else None
        if layer is not None and key.endswith(".weight"):
            try:
                layer.weight = nf4.quantize(t, quant.blocksize, quant.double_quant, quant.quant_type)
            except ValueError as error:
                raise CheckpointError(f"{path}: {key!r}: {error}") from error
        elif layer is not None:
            layer.bias = torch.nn.Parameter(t, requires_grad=False)
        else:
            got[key] = t
        want[key] = None  # seen
    missing = {k for k, v in want.items() if v is not None}
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise CheckpointError(f"{source}: missing keys {sorted(missing)[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(got, strict=False, assign=True)
    model.tie_weights()
    return model


def load_bnb_4bit(model: Llama, tensors, quant: NF4Config, dtype, device, source: str):
    """Fill ``model`` (on meta) from a bitsandbytes 4-bit checkpoint, codes and scales as stored."""
    quantize_model(model, quant)
    got = {key: t.to(device=device, dtype=dtype if t.dtype in _FLOATS else t.dtype)
           for key, t, _ in tensors}
    if model.config.tie_word_embeddings:
        got.pop("lm_head.weight", None)
    try:
        result = model.load_state_dict(got, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: not a bnb-4bit checkpoint of this config: {e}") from None
    missing = set(result.missing_keys) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{source}: bnb-4bit keys do not match the config: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}")
    model.tie_weights()
    return model


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu",
               quantize: NF4Config | None = None) -> Llama:
    """Load a Llama from an HF folder, a ``.gguf`` file or the name ``"smollm2-135m"``.

    Args:
        path: checkpoint folder (``config.json`` + ``*.safetensors``, sharded or not; a
            bitsandbytes 4-bit folder loads straight into ``Linear4bit``), GGUF file, or a
            registered name (``gguf.resolve_model_path``).
        dtype: dtype of the floating-point (non-quantized) weights.
        device: where the weights go.
        quantize: quantize the linears to NF4 layer by layer while loading (a compute dtype of
            "auto" is resolved for ``device``).
    """
    if quantize is not None:
        quantize = dataclasses.replace(quantize, compute_dtype=precision.resolve(quantize.compute_dtype, device))
    path = gguf.resolve_model_path(path)
    if path.is_file() and path.suffix in (".bin", ".pt", ".pth"):
        raise CheckpointError(f"{path}: pickled checkpoints are refused (unpickling can run "
                              "arbitrary code); convert it to safetensors")
    if path.is_file():
        config_dict, state = gguf.load_gguf(path)
        tensors = ((k, v, path) for k, v in state.items())
    else:
        config_dict = read_hf_config(path)
        tensors = iter_safetensors(_checkpoint_files(path))
    config = LlamaConfig.from_dict(config_dict, source=str(path))
    with torch.device("meta"):
        model = Llama(config)
    if "quantization_config" in config_dict:
        try:
            stored = NF4Config.from_hf_quantization_config(config_dict["quantization_config"])
        except ValueError as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from None
        if quantize is not None:
            raise ValueError(f"{path}: the checkpoint is already 4-bit; load it without quantize=")
        return load_bnb_4bit(model, tensors, stored, dtype, device, str(path)).eval()
    return assign_checked(model, tensors, dtype, device, str(path), quantize).eval()


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict]:
    """Split a state dict into consecutive groups of at most ``max_shard_bytes`` each."""
    shards, current, size = [], {}, 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += n
    return shards + [current]


def quantization_of(model: Llama) -> NF4Config | None:
    """The ``NF4Config`` a quantized model was built with (None for a dense one)."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        return None
    q = layers[0].weight
    dense = tuple(sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear)}))
    return NF4Config(blocksize=q.blocksize, double_quant=q.double_quant, quant_type=q.quant_type,
                     compute_dtype=layers[0].compute_dtype, skip_modules=dense)


def save_model(model: Llama, folder, max_shard_size: int = 5 * 2**30, tokenizer=None):
    """Write ``model`` as an HF checkpoint folder transformers can load.

    A model with ``Linear4bit`` layers is written in the bitsandbytes 4-bit layout with its
    ``quantization_config``, as transformers + bitsandbytes read it.
    ``config.json`` plus ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors``
    and ``model.safetensors.index.json`` when larger than ``max_shard_size`` bytes. Every file
    is written atomically. A tied ``lm_head.weight`` is stored once, as transformers does.
    """
    folder = Path(folder)
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        # safetensors stores no shared memory: shared codebooks (NF4 quant maps) get a copy each
        state[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v
        seen.add(v.untyped_storage().data_ptr())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    quant = quantization_of(model)
    if quant is not None:
        config["quantization_config"] = quant.to_hf_quantization_config()
    shards = _shards(state, max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        atomic_write_bytes(folder / name, safetensors_bytes(shard, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        atomic_write_json(folder / "model.safetensors.index.json", index)
    else:
        (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    for stale in folder.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    atomic_write_json(folder / "config.json", config)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
