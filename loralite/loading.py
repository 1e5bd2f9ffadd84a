"""Checkpoints in and out: Hugging Face folders (safetensors, sharded) and GGUF files.

Loading follows gpt-fast: build the model on the meta device (no memory, no init), read
the memory-mapped tensors, check every key and shape, then ``load_state_dict(assign=True)``
so the checkpoint's tensors become the parameters without a second copy.

Pickled checkpoints (``.bin``, ``.pt``) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from loralite import gguf
from loralite.llama import Llama, LlamaConfig

# Safetensors dtype names -> bytes per element, for the header checks.
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header, in bytes


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
    """Yield (key, tensor, file) for every tensor of every file, validated and memory-mapped."""
    for path in files:
        read_safetensors_header(path)
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key), path
        except SafetensorError as e:
            raise CheckpointError(f"{path}: {e}") from None


def expected_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}


def assign_checked(model: Llama, tensors, dtype, device, source: str):
    """Check every key and shape against ``model`` (on meta), then assign them in place.

    ``tensors`` yields (key, tensor, file). A tied ``lm_head.weight`` may be absent.
    """
    want = expected_shapes(model)
    got = {}
    for key, t, path in tensors:
        if key not in want:
            raise CheckpointError(f"{path}: unexpected key {key!r} for this Llama config "
                                  "(another architecture, or a config.json that does not match)")
        if t.shape != want[key]:
            raise CheckpointError(f"{path}: {key!r} has shape {tuple(t.shape)}, the config "
                                  f"needs {tuple(want[key])}")
        got[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    missing = set(want) - set(got)
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise CheckpointError(f"{source}: missing keys {sorted(missing)[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(got, strict=False, assign=True)
    model.tie_weights()
    return model


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu") -> Llama:
    """Load a Llama from an HF folder, a ``.gguf`` file or the name ``"smollm2-135m"``.

    Args:
        path: checkpoint folder (``config.json`` + ``*.safetensors``, sharded or not), GGUF
            file, or a registered name (``gguf.resolve_model_path``).
        dtype: dtype of the floating-point weights.
        device: where the weights go.
    """
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
    return assign_checked(model, tensors, dtype, device, str(path)).eval()


def atomic_write_bytes(path: Path, data: bytes):
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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


def save_model(model: Llama, folder, max_shard_size: int = 5 * 2**30, tokenizer=None):
    """Write ``model`` as an HF checkpoint folder transformers can load.

    ``config.json`` plus ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors``
    and ``model.safetensors.index.json`` when larger than ``max_shard_size`` bytes. Every file
    is written atomically. A tied ``lm_head.weight`` is stored once, as transformers does.
    """
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    config = model.config.to_dict()
    config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
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
