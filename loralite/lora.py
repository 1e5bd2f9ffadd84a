"""LoRA: low-rank adapters around frozen linears (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

A targeted linear ``y = W x + b`` becomes ``y = W x + b + s · B (A (dropout(x)))`` with
``A: (r, in)``, ``B: (out, r)`` and ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA,
Kalajdzievski, 2023, https://arxiv.org/abs/2312.03732). Only ``A`` and ``B`` train; the
update ``ΔW = s · B A`` is formed only when merging it into ``W``. The base may be a dense
``nn.Linear`` or an NF4 ``Linear4bit`` (QLoRA, Dettmers et al., 2023).

Module and parameter names follow PEFT (``q_proj.base_layer.weight``,
``q_proj.lora_A.default.weight``, ``lm_head.modules_to_save.default.weight``) so that
adapter files need no renaming; ``adapters.py`` reads and writes them.

This module is the model-level API: add, switch, disable, delete, combine, merge and count
adapters. The layer itself (``LoraConfig``, ``LoraLinear``) is in ``lora_layer.py``; which
modules get one (PEFT's targeting rules, ``modules_to_save``) is in ``targeting.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from torch import nn

from loralite.llama import Linear
from loralite.lora_layer import LoraConfig, LoraLinear
from loralite.quantize import Linear4bit
from loralite.targeting import (
    ModulesToSave,
    find_targets,
    modules_to_save_wrappers,
    replace_module,
    wrap_modules_to_save,
)

__all__ = [
    "LoraConfig", "LoraLinear", "ModulesToSave", "add_lora", "set_adapter", "disable_adapters",
    "delete_adapter", "add_weighted_adapter", "merge", "unmerge", "merge_and_unload",
    "trainable_parameters", "print_trainable_parameters", "lora_layers",
]


# ----------------------------------------------------------------------------- model-level API


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(module name, LoraLinear)`` for every adapted linear in ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))


def _configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters on ``model``, by name (kept as ``model.lora_configs`` by ``add_lora``)."""
    return model.__dict__.setdefault("lora_configs", {})


def add_lora(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Wrap each linear ``config`` targets in a ``LoraLinear`` (or reuse it) and add adapter ``name``.

    The first adapter on a model becomes active; later ones are added inactive, as in PEFT
    (``set_adapter`` switches). Everything but the active adapters' A/B (and what ``bias`` and
    ``modules_to_save`` ask for) is frozen. Returns ``model``, changed in place.
    """
    configs = _configs(model)
    if name in configs:
        raise ValueError(f"adapter {name!r} already exists on this model; pick another name or delete_adapter it")
    targets = find_targets(model, config, (LoraLinear, nn.Linear, Linear4bit))
    for module_name, module in targets:
        if not isinstance(module, LoraLinear):
            module = replace_module(model, module_name, LoraLinear(module))
        module.add_adapter(name, config.rank_for(module_name), config.scale_for(module_name), config.dropout,
                           config.init)
    if config.modules_to_save:
        wrap_modules_to_save(model, config.modules_to_save, name)
    configs[name] = config
    active = _active(model)
    set_adapter(model, active if active else name)
    return model


def _active(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("lora_active", []))


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters (their outputs add up) and the only trainable ones."""
    names = [names] if isinstance(names, str) else list(names)
    configs = _configs(model)
    missing = [n for n in names if n not in configs]
    if missing:
        raise ValueError(f"no adapter named {missing} on this model; adapters: {sorted(configs)}")
    model.__dict__["lora_active"] = names
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.active_adapters = tuple(n for n in names if n in layer.lora_A)
        for n in layer.active_adapters:
            for p in layer.adapter_parameters(n):
                p.requires_grad_(True)
    for _, wrapper in modules_to_save_wrappers(model):
        wrapper.set_active([n for n in names if n in wrapper.modules_to_save])
    for n in names:
        _train_biases(model, configs[n].bias)


def _train_biases(model: nn.Module, bias: str) -> None:
    """``bias="all"``: every bias trains; ``"lora_only"``: the biases of adapted linears."""
    if bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in lora_layers(model):
            if getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model computes as its base alone (merged adapters are taken out, then put back)."""
    layers = [layer for _, layer in lora_layers(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    wrappers = [w for _, w in modules_to_save_wrappers(model)]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    for w in wrappers:
        w.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(merged[id(layer)], requantize=isinstance(layer.base_layer, Linear4bit))
        for w in wrappers:
            w.disabled = False


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; a layer left with no adapter turns back into its base module."""
    configs = _configs(model)
    if name not in configs:
        raise ValueError(f"no adapter named {name!r} on this model; adapters: {sorted(configs)}")
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            layer.remove_adapter(name)
    for _, wrapper in modules_to_save_wrappers(model):
        wrapper.remove(name)
    for key, module in list(model.named_modules()):
        if isinstance(module, LoraLinear) and not module.lora_A and not module.merged_adapters:
            replace_module(model, key, module.base_layer)  # the last adapter is gone: the plain linear returns
        elif isinstance(module, ModulesToSave) and not module.modules_to_save:
            replace_module(model, key, module.original_module)
    del configs[name]
    remaining = [n for n in _active(model) if n != name]
    model.__dict__["lora_active"] = remaining
    if remaining:
        set_adapter(model, remaining)


# ----------------------------------------------------------------------------- combining, merging, counting


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str,
                         combination_type: str = "linear") -> None:
    """Add adapter ``name`` built from ``adapters`` (PEFT's ``add_weighted_adapter``; it starts inactive).

    ``"linear"`` (equal ranks r): with ``c_i = w_i s_i``, ``A = Σ sign(c_i) sqrt|c_i| A_i`` and
    ``B = Σ sqrt|c_i| B_i``. ``"cat"``: ``A = [c_1 A_1; c_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, rank Σ r_i,
    so ``B A = Σ c_i B_i A_i`` exactly. The new config takes alpha = r (and the first adapter's other fields).
    """
    configs = _configs(model)
    unknown = [a for a in adapters if a not in configs]
    if unknown or len(weights) != len(adapters) or not adapters:
        raise ValueError(f"add_weighted_adapter needs existing adapters and one weight each; unknown {unknown}, "
                         f"{len(adapters)} adapters, {len(weights)} weights")
    if name in configs:
        raise ValueError(f"adapter {name!r} already exists on this model")
    ranks = [max([configs[a].r, *configs[a].rank_pattern.values()]) for a in adapters]
    if len(adapters) > 1 and combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in ("linear", "cat"):
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs equal ranks, got {dict(zip(adapters, ranks))}; "
                             "use combination_type='cat'")
        new_rank, combination_type = ranks[0], "linear"
    else:
        raise ValueError(f"combination_type must be 'linear' or 'cat', got {combination_type!r}")
    targets = [configs[a].target_modules for a in adapters]
    if all(isinstance(t, str) for t in targets):
        target = "|".join(f"({t})" for t in targets)
    elif any(isinstance(t, str) for t in targets):
        raise ValueError("add_weighted_adapter cannot mix regex and list target_modules")
    else:
        target = tuple(sorted(set().union(*targets)))
    config = replace(configs[adapters[0]], r=new_rank, alpha=new_rank, target_modules=target,
                     rank_pattern={}, alpha_pattern={}, modules_to_save=None)
    active = _active(model)
    add_lora(model, config, name)
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            _combine(layer, adapters, weights, name, combination_type)
    set_adapter(model, active)


@torch.no_grad()
def _combine(layer: LoraLinear, adapters: Sequence[str], weights: Sequence[float], name: str, kind: str) -> None:
    a_new, b_new = layer.lora_A[name].weight, layer.lora_B[name].weight  # (R, in), (out, R)
    a_new.zero_(), b_new.zero_()
    present = [(a, w * layer.scaling[a]) for a, w in zip(adapters, weights) if a in layer.lora_A]
    if kind == "cat":
        a_cat = torch.cat([c * layer.lora_A[a].weight for a, c in present])  # (Σ r_i, in)
        b_cat = torch.cat([layer.lora_B[a].weight for a, _ in present], dim=1)  # (out, Σ r_i)
        a_new[: a_cat.shape[0]] = a_cat
        b_new[:, : b_cat.shape[1]] = b_cat
        return
    for a, c in present:
        a_new += math.copysign(math.sqrt(abs(c)), c) * layer.lora_A[a].weight
        b_new += math.sqrt(abs(c)) * layer.lora_B[a].weight


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None, requantize: bool = False) -> nn.Module:
    """Fold the active adapters (or ``adapter_names``) into the base weights; idempotent."""
    names = list(adapter_names) if adapter_names is not None else _active(model)
    for _, layer in lora_layers(model):
        layer.merge([n for n in names if n in layer.lora_A], requantize=requantize)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of the base weights again; idempotent."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return ``model`` with plain ``nn.Linear``s everywhere.

    Each ``LoraLinear`` becomes its merged base, each ``ModulesToSave`` its active copy, and each
    remaining ``Linear4bit`` a dense linear in its compute dtype; the LoRA bookkeeping is dropped.
    """
    merge(model)
    for key, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            replace_module(model, key, _dense_linear(module.base_layer))
        elif isinstance(module, ModulesToSave):
            trained = module.modules_to_save[module.active] if module.active else module.original_module
            replace_module(model, key, trained)
    for key, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            replace_module(model, key, _dense_linear(module))
    model.__dict__.pop("lora_configs", None)
    model.__dict__.pop("lora_active", None)
    return model


def _dense_linear(base: nn.Module) -> nn.Linear:
    if isinstance(base, nn.Linear):
        return base
    dense = Linear(base.in_features, base.out_features, bias=base.bias is not None,
                   device=base.weight.device, dtype=base.compute_dtype)
    with torch.no_grad():
        dense.weight.copy_(base.dequantize_weight())
        if base.bias is not None:
            dense.bias.copy_(base.bias)
    return dense.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, as PEFT's ``get_nb_trainable_parameters`` reports them.

    A 4-bit weight counts as its logical ``out * in`` elements (PEFT counts bitsandbytes'
    packed ``Params4bit`` as 2 per byte); shared (tied) parameters count once.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts in PEFT's wording."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
