"""LoRA: low-rank adapters around frozen linears (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

A targeted linear ``y = W x + b`` becomes ``y = W x + b + s · B (A (dropout(x)))`` with
``A: (r, in)``, ``B: (out, r)`` and ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA,
Kalajdzievski, 2023, https://arxiv.org/abs/2312.03732). Only ``A`` and ``B`` train; the
update ``ΔW = s · B A`` is formed only when merging it into ``W``. The base may be a dense
``nn.Linear`` or an NF4 ``Linear4bit`` (QLoRA, Dettmers et al., 2023).

Module and parameter names follow PEFT (``q_proj.base_layer.weight``,
``q_proj.lora_A.default.weight``, ``lm_head.modules_to_save.default.weight``) so that
adapter files need no renaming; ``adapters.py`` reads and writes them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from loralite import nf4
from loralite.quantize import Linear4bit

log = logging.getLogger(__name__)

__all__ = [
    "LoraConfig", "LoraLinear", "ModulesToSave", "add_lora", "set_adapter", "disable_adapters",
    "delete_adapter", "add_weighted_adapter", "merge", "unmerge", "merge_and_unload",
    "trainable_parameters", "print_trainable_parameters", "lora_layers",
]


def _as_names(value, option: str) -> tuple[str, ...] | str | None:
    """A list of module names as a tuple (hashable, frozen); a string stays a regex."""
    if value is None or isinstance(value, str):
        return value
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"LoraConfig.{option} must be a string or a list of strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class LoraConfig:
    """Which linears get an adapter, and its shape, scale and initialisation (PEFT's ``LoraConfig``)."""

    r: int = 8  # rank of A (r, in) and B (out, r)
    alpha: float = 8  # scale numerator: s = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the adapter's input only, active in training mode
    # list: module names matched as name suffixes ("q_proj" matches "model.layers.0.self_attn.q_proj");
    # str: a regex matched against the full module name (re.fullmatch); "all-linear": every linear but lm_head
    target_modules: Sequence[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = None  # same matching as target_modules; wins over it
    layers_to_transform: Sequence[int] | int | None = None  # only these decoder-layer indices (None: all)
    layers_pattern: Sequence[str] | str | None = None  # name of the layer list ("layers"); None: first number
    bias: str = "none"  # which biases train too: "none", "all" (every bias), "lora_only" (targeted layers')
    use_rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)
    init: bool | str = True  # True: A Kaiming-uniform(a=sqrt(5)), B = 0; "gaussian": A ~ N(0, 1/r); False: both random
    modules_to_save: Sequence[str] | None = None  # modules trained in full (a copy) and saved with the adapter
    rank_pattern: dict = field(default_factory=dict)  # {name regex: r}, matched as "(.*\.)?(key)$" like PEFT
    alpha_pattern: dict = field(default_factory=dict)  # {name regex: alpha}, same matching

    def __post_init__(self):
        for option in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
            object.__setattr__(self, option, _as_names(getattr(self, option), option))
        if isinstance(self.layers_to_transform, list):
            object.__setattr__(self, "layers_to_transform", tuple(self.layers_to_transform))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        if self.target_modules is None or len(self.target_modules) == 0:
            raise ValueError("LoraConfig.target_modules is required: e.g. ['q_proj', 'v_proj'] or 'all-linear'")
        ranks = [self.r, *self.rank_pattern.values()]
        if not all(isinstance(r, int) and r > 0 for r in ranks):
            raise ValueError(f"LoraConfig.r and rank_pattern values must be positive integers, got {ranks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig.init must be True, False or 'gaussian', got {self.init!r}")

    def rank_for(self, module_name: str) -> int:
        """The rank of the adapter on ``module_name``: the first matching ``rank_pattern`` key, else ``r``."""
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module_name), self.r)

    def scale_for(self, module_name: str) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, after the per-module overrides."""
        r = self.rank_for(module_name)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_name), self.alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict, module_name: str) -> str | None:
    """The first key of ``patterns`` that matches the end of ``module_name`` on a dot boundary (PEFT's rule)."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module_name)), None)


class LoraLinear(nn.Module):
    """A frozen linear plus named low-rank adapters: ``y = base(x) + Σ_active s_a · B_a A_a dropout(x)``.

    ``base_layer`` is an ``nn.Linear`` or a ``Linear4bit``. Each adapter ``a`` owns
    ``lora_A[a]`` (r -> in) and ``lora_B[a]`` (out <- r), both bias-free ``nn.Linear``s.
    Adapters listed in ``merged_adapters`` live inside the base weight and are skipped.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []  # in merge order; unmerged in reverse
        self.disabled = False  # True inside `disable_adapters`: the base alone
        self.train(base_layer.training)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(self, name: str, r: int, scale: float, dropout: float, init: bool | str) -> None:
        """Create adapter ``name``; with ``init=True`` its update starts at zero (B = 0)."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete_adapter it first")
        weight = _base_weight_like(self.base_layer)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.scaling[name] = scale
        if weight.device.type == "meta" or init is False:
            return  # nn.Linear's own init (Kaiming-uniform, a=sqrt(5)) for both; nothing to fill on meta
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)

    def adapter_parameters(self, name: str | None = None) -> Iterator[nn.Parameter]:
        """The A and B weights of adapter ``name`` (all adapters when None)."""
        for n in ([name] if name is not None else list(self.lora_A)):
            yield self.lora_A[n].weight
            yield self.lora_B[n].weight

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name`` (unmerge first if it is merged)."""
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge(model) before deleting it")
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.scaling[name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            a = self.lora_A[name].weight.to(x.dtype)  # (r, in); computed in the input dtype
            b = self.lora_B[name].weight.to(result.dtype)  # (out, r)
            h = F.linear(self.lora_dropout[name](x), a).to(result.dtype)  # (..., r)
            # result + s · h Bᵀ in one GEMM with beta = 1; ΔW = s B A is never formed
            out2d = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), b.t(),
                                alpha=self.scaling[name])  # (N, out)
            result = out2d.view(result.shape)
        return result

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW = s · B A`` in float32, shape (out, in)."""
        a = self.lora_A[name].weight.detach().float()
        b = self.lora_B[name].weight.detach().float()
        return self.scaling[name] * (b @ a)

    @torch.no_grad()
    def merge(self, names: Sequence[str], requantize: bool = False) -> None:
        """Add ``ΔW`` of each unmerged adapter in ``names`` to the base weight, in float32.

        A ``Linear4bit`` base is dequantized first; the merged weight then stays dense in the compute
        dtype, or is quantized to NF4 again with ``requantize=True``. The error of that last rounding
        is measured and logged.
        """
        todo = [n for n in names if n not in self.merged_adapters]
        if not todo:
            return
        w = _dense_weight(self.base_layer)  # (out, in) float32
        for name in todo:
            w += self.delta_weight(name)
        self._set_weight(w, requantize)
        self.merged_adapters.extend(todo)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract every merged adapter's ``ΔW`` again (float32), undoing ``merge`` up to rounding."""
        if not self.merged_adapters:
            return
        w = _dense_weight(self.base_layer)
        for name in reversed(self.merged_adapters):
            w -= self.delta_weight(name)
        self._set_weight(w, requantize=isinstance(self.base_layer, Linear4bit))
        self.merged_adapters.clear()

    def _set_weight(self, w: torch.Tensor, requantize: bool) -> None:
        """Store the float32 weight ``w`` into the base: dense in place, or NF4 again, logging the rounding error."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            base.weight.copy_(w)
            return
        if requantize:
            q = base.weight
            base.weight = nf4.quantize(w.to(q.dtype), blocksize=q.blocksize, double_quant=q.double_quant,
                                       quant_type=q.quant_type)
            stored = base.weight.dequantize(torch.float32)
        else:
            self.base_layer = dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                                device=w.device, dtype=base.compute_dtype)
            dense.weight.requires_grad_(False).copy_(w)
            if base.bias is not None:
                dense.bias = base.bias
            stored = dense.weight.float()
        err = (stored - w).abs()
        log.info("LoRA merge into a 4-bit base (%s): max |error| %.3g, mean %.3g", "NF4" if requantize else
                 str(base.compute_dtype), err.max().item(), err.mean().item())


def _base_weight_like(base: nn.Module) -> torch.Tensor:
    """A tensor with the device and dtype the adapter weights should take (float32 over a 4-bit base)."""
    if isinstance(base, Linear4bit):
        return torch.empty(0, device=base.weight.device, dtype=torch.float32)
    return base.weight


def _dense_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as a fresh float32 (out, in) tensor."""
    if isinstance(base, Linear4bit):
        return base.weight.dequantize(torch.float32)
    return base.weight.detach().float().clone()


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
            module = _replace(model, module_name, LoraLinear(module))
        module.add_adapter(name, config.rank_for(module_name), config.scale_for(module_name), config.dropout,
                           config.init)
    if config.modules_to_save:
        wrap_modules_to_save(model, config.modules_to_save, name)
    configs[name] = config
    active = _active(model)
    set_adapter(model, active if active else name)
    return model


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return new


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
    for _, wrapper in _modules_to_save(model):
        wrapper.set_active([n for n in names if n in wrapper.modules_to_save])
    for n in names:
        _train_biases(model, configs[n].bias)


def _modules_to_save(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave))


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
    wrappers = [w for _, w in _modules_to_save(model)]
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
    for _, wrapper in _modules_to_save(model):
        wrapper.remove(name)
    for key, module in list(model.named_modules()):
        if isinstance(module, LoraLinear) and not module.lora_A and not module.merged_adapters:
            _replace(model, key, module.base_layer)  # the last adapter is gone: the plain linear returns
        elif isinstance(module, ModulesToSave) and not module.modules_to_save:
            _replace(model, key, module.original_module)
    del configs[name]
    remaining = [n for n in _active(model) if n != name]
    model.__dict__["lora_active"] = remaining
    if remaining:
        set_adapter(model, remaining)


# ----------------------------------------------------------------------------- targeting


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
            module = _replace(model, key, ModulesToSave(module))
        module.add(adapter)


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
            _replace(model, key, _dense_linear(module.base_layer))
        elif isinstance(module, ModulesToSave):
            _replace(model, key, module.modules_to_save[module.active] if module.active else module.original_module)
    for key, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            _replace(model, key, _dense_linear(module))
    model.__dict__.pop("lora_configs", None)
    model.__dict__.pop("lora_active", None)
    return model


def _dense_linear(base: nn.Module) -> nn.Linear:
    if isinstance(base, nn.Linear):
        return base
    dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
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
