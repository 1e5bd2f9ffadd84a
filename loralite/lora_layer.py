"""The LoRA layer: a frozen linear plus named low-rank adapters, and the config that shapes them.

``LoraLinear`` computes ``y = W x + b + s · B (A (dropout(x)))`` for each active adapter, with
``A: (r, in)``, ``B: (out, r)`` and ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA); it
merges ``ΔW = s · B A`` into a dense or NF4 base on request. ``lora.py`` puts these layers into
a model; the formulas and papers are in its docstring.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from loralite import nf4, ops
from loralite.llama import Linear
from loralite.quantize import Linear4bit

# Merge messages go to the logger of the public module, where users look for them.
log = logging.getLogger("loralite.lora")

__all__ = ["LoraConfig", "LoraLinear"]


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


class _Dropout(torch.autograd.Function):
    """Inverted dropout (``ops.dropout``) that keeps its mask as bool, one byte an element, for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        y, keep = ops.dropout(x, p)
        ctx.scale = 1 / (1 - p)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(keep)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return ops.dropout_backward(grad, keep, ctx.scale), None


def _dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` (an ``nn.Dropout`` or ``nn.Identity``) applied to x, through ``_Dropout``."""
    if isinstance(module, nn.Dropout) and module.training and module.p > 0:
        return _Dropout.apply(x, module.p)
    return x


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
            h = F.linear(_dropout(self.lora_dropout[name], x), a).to(result.dtype)  # (..., r)
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
            self.base_layer = dense = Linear(base.in_features, base.out_features, bias=base.bias is not None,
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

