"""Which modules of a model get an adapter, and the full-copy wrapper for ``modules_to_save``.

The rules are PEFT's, so that a PEFT ``adapter_config.json`` selects the same modules here:
``target_modules`` as a list matches names or dotted suffixes, as a string a regex over the
whole name; ``exclude_modules`` wins; ``layers_to_transform`` keeps only some decoder layers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Sequence

from torch import nn

from loralite.lora_layer import LoraConfig, LoraLinear
from loralite.quantize import Linear4bit

__all__ = ["find_targets", "ModulesToSave", "wrap_modules_to_save", "modules_to_save_wrappers", "replace_module"]


def replace_module(model: nn.Module, module_name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``module_name`` is in ``model``; returns ``new``."""
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return new


def _matches(names: Sequence[str] | str, key: str) -> bool:
    """PEFT's rule: a string is a regex over the whole name; a list matches the name or a dotted suffix."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return key in names or any(key.endswith(f".{n}") for n in names)


def _layer_index(config: LoraConfig, key: str) -> int | None:
    """The decoder-layer index in ``key`` ("model.layers.3.mlp.up_proj" -> 3), found as PEFT finds it."""
    if config.layers_pattern is None or len(config.layers_pattern) == 0:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
    return int(match["idx"]) if match else None


def _is_target(config: LoraConfig, key: str, module: nn.Module, linear_types: tuple) -> bool:
    if config.exclude_modules and _matches(config.exclude_modules, key):
        return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    if config.target_modules == "all-linear":
        if not isinstance(module, linear_types) or key == "lm_head" or key.endswith(".lm_head"):
            return False
    elif not _matches(config.target_modules, key):
        return False
    elif config.layers_to_transform is None or isinstance(config.target_modules, str):
        return True  # PEFT applies layers_to_transform to list targets only
    if config.layers_to_transform is None:
        return True
    index = _layer_index(config, key)
    wanted = config.layers_to_transform
    return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def find_targets(model: nn.Module, config: LoraConfig, linear_types: tuple) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs ``config`` targets; each must be one of ``linear_types``.

    Modules inside an existing ``LoraLinear`` (its base layer, its A and B) are never targets.

    Raises:
        ValueError: nothing matches, or a match is not a linear (naming it).
    """
    inner = set()
    found = []
    for key, module in model.named_modules():
        if key in inner or not key:
            continue
        if isinstance(module, (LoraLinear, ModulesToSave)):
            inner.update(f"{key}.{sub}" for sub, _ in module.named_modules() if sub)
        if not _is_target(config, key, module, linear_types):
            continue
        if not isinstance(module, linear_types):
            raise ValueError(f"target_modules {config.target_modules!r} matched {key!r}, a "
                             f"{type(module).__name__}; LoRA wraps only nn.Linear and Linear4bit layers")
        found.append((key, module))
    if not found:
        some = [k for k, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))][:8]
        raise ValueError(f"target_modules {config.target_modules!r} matched no module of {type(model).__name__}; "
                         f"linear modules include {some}")
    return found


class ModulesToSave(nn.Module):
    """A module trained in full: a frozen ``original_module`` and one trainable copy per adapter (PEFT's layout)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None  # which copy computes; None: the original
        self.disabled = False

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def remove(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def set_active(self, names: list[str]) -> None:
        """Activate one copy (trainable); several active copies of one module cannot add up."""
        if len(names) > 1:
            raise ValueError(f"adapters {names} each keep their own copy of a modules_to_save module; "
                             "activate only one of them")
        self.active = names[0] if names else None
        if self.active is not None:
            self.modules_to_save[self.active].requires_grad_(True)

    def forward(self, *args, **kwargs):
        if self.disabled or self.active is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)


def wrap_modules_to_save(model: nn.Module, names: Sequence[str], adapter: str) -> None:
    """Give each module named by ``names`` (exact name or dotted suffix) a trainable copy for ``adapter``."""
    keys = [k for k, m in model.named_modules()
            if k and _matches(names, k) and ".modules_to_save." not in k and not k.endswith(".original_module")]
    if not keys:
        raise ValueError(f"modules_to_save {list(names)} matched no module of {type(model).__name__}")
    for key in keys:
        module = model.get_submodule(key)
        if not isinstance(module, ModulesToSave):
            module = replace_module(model, key, ModulesToSave(module))
        module.add(adapter)


def modules_to_save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """``(module name, ModulesToSave)`` for every module trained in full."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave))
