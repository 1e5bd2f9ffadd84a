"""LoRA adapters on disk, in PEFT's layout, so either library reads the other's files.

A folder holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields) and
``adapter_model.safetensors`` whose keys are the model's parameter names, prefixed with
``base_model.model.`` and with the adapter name taken out::

    model key  model.layers.0.self_attn.q_proj.lora_A.default.weight
    file key   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    model key  lm_head.modules_to_save.default.weight
    file key   base_model.model.lm_head.weight

Pickled ``adapter_model.bin`` files are refused: unpickling runs code from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loralite import lora, targeting
from loralite.files import atomic_write, atomic_write_text

__all__ = ["save_adapter", "load_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Fields of PEFT's LoraConfig that loralite reads, and the LoraConfig field each becomes.
_FIELDS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
           "exclude_modules": "exclude_modules", "layers_to_transform": "layers_to_transform",
           "layers_pattern": "layers_pattern", "bias": "bias", "use_rslora": "use_rslora",
           "init_lora_weights": "init", "modules_to_save": "modules_to_save", "rank_pattern": "rank_pattern",
           "alpha_pattern": "alpha_pattern"}
# PEFT fields that do not change the adapter's arithmetic, whatever their value.
_IGNORED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
            "auto_mapping", "megatron_core", "qalora_group_size"}


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` under PEFT's file keys (see the module docstring)."""
    configs = getattr(model, "lora_configs", {})
    if name not in configs:
        raise ValueError(f"no adapter named {name!r} on this model; adapters: {sorted(configs)}")
    out = {}
    for key, layer in lora.lora_layers(model):
        if name in layer.lora_A:
            out[f"{key}.lora_A.weight"] = layer.lora_A[name].weight
            out[f"{key}.lora_B.weight"] = layer.lora_B[name].weight
        bias = getattr(layer.base_layer, "bias", None)
        if configs[name].bias == "lora_only" and bias is not None:
            out[f"{key}.base_layer.bias"] = bias
    for key, wrapper in targeting.modules_to_save_wrappers(model):
        if name in wrapper.modules_to_save:
            out.update({f"{key}.{k}": v for k, v in wrapper.modules_to_save[name].state_dict().items()})
    if configs[name].bias == "all":
        out.update({k: v for k, v in model.state_dict().items()
                    if k.endswith(".bias") and ".modules_to_save." not in k and ".original_module." not in k})
    return {PREFIX + k: v for k, v in out.items()}


def peft_config_dict(config: lora.LoraConfig, target_modules, base_model_name_or_path: str | None) -> dict:
    """``config`` as the ``adapter_config.json`` PEFT writes (PEFT's field names and defaults)."""
    listed = lambda v: sorted(v) if v is not None and not isinstance(v, str) else v  # noqa: E731
    layers = config.layers_to_transform
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "auto_mapping": None,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": listed(target_modules), "exclude_modules": listed(config.exclude_modules),
        "layers_to_transform": list(layers) if isinstance(layers, tuple) else layers,
        "layers_pattern": list(config.layers_pattern) if isinstance(config.layers_pattern, tuple)
        else config.layers_pattern,
        "bias": config.bias, "use_rslora": config.use_rslora, "use_dora": False, "lora_bias": False,
        "fan_in_fan_out": False, "init_lora_weights": config.init, "layer_replication": None,
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "rank_pattern": dict(config.rank_pattern), "alpha_pattern": dict(config.alpha_pattern),
        "loftq_config": {}, "megatron_config": None, "megatron_core": "megatron.core",
    }


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to ``directory`` in PEFT's layout; each file atomically."""
    tensors = {k: v.detach().contiguous().clone() for k, v in adapter_state_dict(model, name).items()}
    config = model.lora_configs[name]
    targets = config.target_modules
    if targets == "all-linear":  # written resolved, as PEFT writes it
        targets = [k for k, layer in lora.lora_layers(model) if name in layer.lora_A]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    text = json.dumps(peft_config_dict(config, targets, base_model_name_or_path), indent=2, sort_keys=True)
    atomic_write_text(directory / CONFIG_NAME, text + "\n")
    return directory


def read_config(directory: Path) -> lora.LoraConfig:
    """The ``LoraConfig`` of ``directory/adapter_config.json``; PEFT features loralite lacks are refused."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise OSError(f"{path} not found: an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path}: peft_type is {kind!r}; only LoRA adapters ('LORA') can be loaded")
    unsupported = {k: v for k, v in raw.items() if k not in _FIELDS and k not in _IGNORED and v}
    if unsupported:
        raise ValueError(f"{path} uses PEFT options loralite does not implement: {unsupported}")
    try:
        return lora.LoraConfig(**{ours: raw[theirs] for theirs, ours in _FIELDS.items() if theirs in raw})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        pickled = [p.name for p in directory.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth")]
        if pickled:
            raise OSError(f"{directory / pickled[0]} is a pickle, which loralite never loads (unpickling runs "
                          f"code); convert it to {WEIGHTS_NAME} in a trusted environment")
        raise OSError(f"{path} not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise OSError(f"{path} could not be read as safetensors: {e}") from e


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Add the adapter in ``directory`` (PEFT's layout) to ``model`` as ``name``, strictly.

    The config's targeting wraps the model's linears (which need no LoRA yet); then the file
    must hold exactly the expected tensors with the expected shapes. On any mismatch the model is
    left as it was and a ``ValueError`` names the keys at fault.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise OSError(f"adapter folder {directory} not found")
    config = read_config(directory)
    tensors = _read_weights(directory)
    try:
        lora.add_lora(model, config, name)
    except ValueError as e:
        raise ValueError(f"{directory / CONFIG_NAME} does not fit this {type(model).__name__}: {e}") from e
    try:
        _copy_checked(adapter_state_dict(model, name), tensors, directory / WEIGHTS_NAME, config)
    except ValueError:
        lora.delete_adapter(model, name)
        raise
    return model


@torch.no_grad()
def _copy_checked(expected: dict, tensors: dict, path: Path, config: lora.LoraConfig) -> None:
    """Copy ``tensors`` into the parameters ``expected`` (same keys), after checking keys and shapes."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config on this model: missing keys {missing[:5]} "
                         f"({len(missing)} in all), unexpected keys {unexpected[:5]} ({len(unexpected)} in all)")
    for key, param in expected.items():
        if tensors[key].shape != param.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, but the model expects "
                             f"{tuple(param.shape)} (config r={config.r}, rank_pattern={config.rank_pattern})")
    for key, param in expected.items():
        param.copy_(tensors[key])
