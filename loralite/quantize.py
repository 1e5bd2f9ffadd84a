"""QLoRA's frozen 4-bit linear: ``Linear4bit``, its autograd Function, and ``quantize_model``.

A ``Linear4bit`` holds its weight as an ``NF4Tensor`` (4.127 bits per weight) and computes
``y = x W^T + b`` in ``compute_dtype`` by dequantizing W on the fly. The backward pass
dequantizes again rather than keeping the dense W alive between forward and backward (as
torchao's ``LinearNF4``), so activation memory never holds a 16-bit copy of the weight.
Its ``state_dict`` is the bitsandbytes 4-bit layout Hugging Face checkpoints use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from loralite import nf4, ops, precision
from loralite.nf4 import NF4Tensor

_BNB_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class NF4Config:
    """How ``quantize_model`` turns linears into ``Linear4bit``."""

    blocksize: int = 64  # elements per absmax block; Hugging Face bnb-4bit checkpoints always use 64
    double_quant: bool = True  # 8-bit block scales (QLoRA): 4.127 instead of 4.5 bits per weight
    quant_type: str = "nf4"  # "nf4" (NormalFloat, for normally distributed weights) or "fp4"
    # dtype of the dequantized weight in the matmuls; "auto": bf16 on CUDA and on CPUs with bf16
    # units where it measures faster, float32 elsewhere (loralite.precision), fixed per layer when quantized
    compute_dtype: torch.dtype | str = precision.AUTO
    skip_modules: tuple[str, ...] = ("lm_head",)  # module names (or dotted-name components) kept dense

    def __post_init__(self) -> None:
        if self.blocksize not in nf4.BLOCKSIZES:
            raise ValueError(f"NF4Config.blocksize must be one of {nf4.BLOCKSIZES}, got {self.blocksize}")
        if self.quant_type not in nf4.QUANT_TYPES:
            raise ValueError(f"NF4Config.quant_type must be one of {nf4.QUANT_TYPES}, got {self.quant_type!r}")
        if self.compute_dtype not in (*nf4.FLOAT_DTYPES, precision.AUTO):
            raise ValueError(f"NF4Config.compute_dtype must be 'auto' or one of {nf4.FLOAT_DTYPES}, "
                             f"got {self.compute_dtype!r}")

    def to_hf_quantization_config(self) -> dict:
        """The ``quantization_config`` of a Hugging Face ``config.json`` (transformers' BitsAndBytesConfig)."""
        if self.blocksize != 64:
            raise ValueError(f"bitsandbytes checkpoints use blocksize 64; NF4Config.blocksize is {self.blocksize}")
        return {
            "quant_method": "bitsandbytes",
            "_load_in_8bit": False,
            "_load_in_4bit": True,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": list(self.skip_modules),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": str(precision.resolve(self.compute_dtype)).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "load_in_4bit": True,
            "load_in_8bit": False,
        }

    @classmethod
    def from_hf_quantization_config(cls, qc: dict) -> NF4Config:
        """Read a Hugging Face bitsandbytes ``quantization_config``; only 4-bit is supported."""
        if qc.get("quant_method") != "bitsandbytes" or not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
            raise ValueError(f"quantization_config is not bitsandbytes 4-bit (load_in_4bit=true): {qc}")
        compute = qc.get("bnb_4bit_compute_dtype") or "float32"
        if compute not in _BNB_DTYPES:
            raise ValueError(f"quantization_config.bnb_4bit_compute_dtype {compute!r} is not one of {list(_BNB_DTYPES)}")
        return cls(
            blocksize=64,
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            quant_type=qc.get("bnb_4bit_quant_type", "fp4"),
            compute_dtype=_BNB_DTYPES[compute],
            # transformers keeps the output head dense when the checkpoint names no modules
            skip_modules=tuple(qc.get("llm_int8_skip_modules") or ("lm_head",)),
        )


class NF4Matmul(torch.autograd.Function):
    """``y = x W^T`` for a frozen 4-bit ``W`` (out, in), saving only the 4-bit weight.

    Forward: ``y = x @ deq(W).T``. Backward: ``dL/dx = dL/dy @ deq(W)``, dequantizing W again;
    W is frozen, so there is no weight gradient and neither ``x`` nor ``deq(W)`` is saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor) -> torch.Tensor:
        ctx.weight = weight  # the NF4Tensor only: ~0.5 byte per weight
        return ops.nf4_matmul(x, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        grad_x = ops.nf4_matmul_t(grad_out, ctx.weight) if ctx.needs_input_grad[0] else None
        return grad_x, None


class Linear4bit(nn.Module):
    """A linear layer with a frozen 4-bit weight: ``y = x deq(W)^T + b`` in ``compute_dtype``.

    ``weight`` is an ``NF4Tensor`` (a plain attribute, not a Parameter, never trained); ``bias``
    an optional Parameter. ``.to(device)`` moves both. The output takes the dtype of the input (under
    autocast, the autocast dtype, as ``nn.Linear``'s).
    """

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=bias.requires_grad)
        self.compute_dtype = precision.resolve(compute_dtype, weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: NF4Config = NF4Config()) -> Linear4bit:
        """Quantize ``linear.weight`` (the bias is kept as it is)."""
        q = nf4.quantize(linear.weight.detach(), config.blocksize, config.double_quant, config.quant_type)
        bias = None if linear.bias is None else linear.bias.detach().requires_grad_(linear.bias.requires_grad)
        return cls(q, bias, config.compute_dtype)

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str,
                            compute_dtype: torch.dtype | str = torch.bfloat16) -> Linear4bit:
        """Build straight from the bnb-4bit tensors under ``prefix`` (e.g. ``"model.layers.0.mlp.up_proj."``).

        No dequantize/requantize round trip: the packed codes and scales are used as stored.
        """
        q = NF4Tensor.from_bnb_state_dict(sd, prefix + "weight")
        bias = sd.get(prefix + "bias")
        return cls(q, None if bias is None else bias.detach().requires_grad_(False), compute_dtype)

    def dequantize_weight(self) -> torch.Tensor:
        """The dense (out, in) weight in ``compute_dtype``."""
        return ops.dequantize(self.weight, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = NF4Matmul.apply(x.to(self.compute_dtype), self.weight)  # (..., out)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        # The input's dtype, or under autocast the autocast dtype, as nn.Linear's output would be.
        autocast = torch.is_autocast_enabled(x.device.type)
        return y.to(torch.get_autocast_dtype(x.device.type) if autocast else x.dtype)

    def extra_repr(self) -> str:
        q = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={q.quant_type}, blocksize={q.blocksize}, double_quant={q.double_quant}, "
                f"compute_dtype={self.compute_dtype}")

    def _apply(self, fn, recurse: bool = True):
        # Module.to/cuda/cpu move parameters through ``fn``; the NF4Tensor follows to the same device,
        # with its dtypes untouched (a model.to(bfloat16) must not round the float32 scales).
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, dtype=torch.uint8, device=self.weight.device)).device
        self.weight = self.weight.to(device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' order: weight, bias, then the weight's quantization state.
        state = self.weight.to_bnb_state_dict(prefix + "weight")
        destination[prefix + "weight"] = state.pop(prefix + "weight")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = [k for k in state_dict if k.startswith(prefix)]  # a Linear4bit has no children: all are its keys
        if prefix + "weight" not in state_dict:  # a partial load (e.g. adapter tensors only)
            missing_keys.append(prefix + "weight")
            return
        try:
            q = NF4Tensor.from_bnb_state_dict(state_dict, prefix + "weight")
        except ValueError as e:
            missing_keys.append(prefix + "weight")
            error_msgs.append(str(e))
            return
        if tuple(q.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: shape {tuple(q.shape)} in the checkpoint, "
                              f"{(self.out_features, self.in_features)} in the model")
            return
        assign = local_metadata.get("assign_to_params_buffers", False) or self.weight.device.type == "meta"
        self.weight = q if assign else q.to(self.weight.device)
        expected = set(self.weight.to_bnb_state_dict(prefix + "weight"))
        if self.bias is not None:
            expected.add(prefix + "bias")
            self._load_bias(state_dict, prefix + "bias", assign, missing_keys)
        if strict:
            unexpected_keys.extend(k for k in own if k not in expected)

    def _load_bias(self, state_dict, key, assign, missing_keys) -> None:
        if key not in state_dict:
            missing_keys.append(key)
        elif assign:
            self.bias = nn.Parameter(state_dict[key], requires_grad=self.bias.requires_grad)
        else:
            with torch.no_grad():
                self.bias.copy_(state_dict[key])


def _skipped(name: str, skip_modules: tuple[str, ...]) -> bool:
    return name in skip_modules or any(part in skip_modules for part in name.split("."))


def quantize_model(model: nn.Module, config: NF4Config = NF4Config(),
                   make: Callable[[str, nn.Linear], Linear4bit] | None = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` not named in ``config.skip_modules`` by a ``Linear4bit``.

    Each layer is quantized and its dense weight released before the next, so peak memory
    grows by one layer at most. Returns ``model``.

    Args:
        make: builds the ``Linear4bit`` for ``(name, linear)``; by default
            ``Linear4bit.from_linear(linear, config)``. The memory estimator passes one that
            makes meta-device codes, without computing any.
    """
    make = make or (lambda name, linear: Linear4bit.from_linear(linear, config))
    if isinstance(model, nn.Linear):
        raise ValueError("quantize_model replaces linears inside a model; for a bare nn.Linear use Linear4bit.from_linear")
    for name, module in model.named_modules():
        if hasattr(module, "adapter_parameters"):  # a LoraLinear: its lora_A/lora_B are linears too
            raise ValueError(f"quantize_model: {name!r} already carries LoRA adapters, whose own linears would "
                             "be quantized; quantize the base first, then add_lora (QLoRA's order)")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not _skipped(name, config.skip_modules):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            try:
                setattr(parent, child, make(name, module))
            except ValueError as error:
                raise ValueError(f"quantize_model: {name!r}: {error}") from error
    return model
