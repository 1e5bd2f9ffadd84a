"""AdamW with 8-bit blockwise-quantized optimizer states (Dettmers et al., 2022).

"8-bit Optimizers via Block-wise Quantization" (arXiv:2110.02861) keeps Adam's two
moment estimates in one byte per element instead of four. Each state tensor is cut
into blocks of ``block_size`` elements; a block stores one fp32 scale (its absolute
maximum) and, per element, the index of the nearest entry of a 256-value codebook
after dividing by that scale:

    state[i] ~= code[q[i]] * absmax[i // block_size]

The codebook is the *dynamic* (tree) map of Dettmers (2016, arXiv:1511.04561): one
decade of magnitude per exponent, from 1e-6 to 1, so small and large moments both keep
a few significant bits. The first moment ``m`` (signed) uses the signed map; the second
moment ``v`` (never negative) the unsigned map, which spends the sign bit on precision.

Each step dequantizes both states, applies the fp32 AdamW update, and quantizes them
again, exactly as bitsandbytes' ``AdamW8bit`` does; the parameter update itself uses
the fp32 states of this step. Tensors smaller than ``min_8bit_size`` keep fp32 states
(their scales would cost more than they save), also as in bitsandbytes.
"""

from __future__ import annotations

import math
import sys

import torch

from loralite.nf4 import dynamic_map

# The optimizers a training run can take (TrainConfig.optim): torch.optim.AdamW, or AdamW8bit below.
OPTIMIZERS = ("adamw", "adamw_8bit")
# Elements per update chunk. A chunk's temporaries peak at 17 bytes per element (m and v in
# fp32, the lookup key and threshold): 68 MiB whatever the tensor size, so 8-bit states also
# keep the *peak* memory low. Each chunk costs ~30 torch ops, and on busy cores every parallel
# op waits for its slowest thread: 2^20-element chunks made a step 2-3x slower than 2^22 on 2
# shared cores.
_CHUNK_ELEMENTS = 1 << 22
# Which uint16 of a float32's two holds its top 16 bits (sign, exponent, 7 mantissa bits).
_HIGH_HALF = 1 if sys.byteorder == "little" else 0


class NearestCode:
    """Exact nearest-code lookup in a sorted 256-entry map, from the top 16 bits of a float32.

    The nearest code of x is the number of midpoints ``mid[i] = (code[i] + code[i+1]) / 2``
    below x, which ``torch.bucketize(x, mid)`` finds by a binary search (8 data-dependent
    branches per element, the slowest step of the optimizer). Instead, split all float32
    values into 65536 buckets by their top 16 bits (sign, exponent, 7 mantissa bits; a bucket
    spans 2^-8 to 2^-7 of its values' magnitude). Where no bucket holds two midpoints, one
    comparison finishes the job:

        k = bits(x) >> 16
        q = base[k] + (x > threshold[k])

    with ``base[k]`` the count for the bucket's lowest value and ``threshold[k] = mid[base[k]]``
    (+inf past the last midpoint). The result equals ``torch.bucketize(x, mid)`` for every
    non-NaN x. The dynamic maps qualify (their closest midpoints, near 1, are 0.7% apart;
    buckets there span 0.4%); the constructor checks any map.

    Args:
        code: (256,) ascending float32 map.

    Raises:
        ValueError: two midpoints of ``code`` fall in one bucket (a map far finer than 8 bits).
    """

    def __init__(self, code: torch.Tensor):
        self.code = code
        mid = (code[:-1] + code[1:]) / 2  # (255,)
        key = torch.arange(1 << 16, dtype=torch.int64, device=code.device)
        # The bucket's two extreme float32 bit patterns, as signed int32 (two's complement).
        ends = [(key << 16) + low for low in (0, 0xFFFF)]
        ends = [torch.where(e >= 1 << 31, e - (1 << 32), e).to(torch.int32).view(torch.float32) for e in ends]
        counts = torch.stack([torch.bucketize(e, mid) for e in ends])  # (2, 65536); monotonic inside a bucket
        base = counts.amin(dim=0)  # (65536,)
        finite = ~(ends[0].isnan() | ends[1].isnan())  # a NaN state has no nearest code
        if (counts.amax(dim=0) - base)[finite].max() > 1:
            raise ValueError("NearestCode: two midpoints of the code fall in one 16-bit float bucket; "
                             "use torch.bucketize against the midpoints for so fine a map")
        self.base = base.to(torch.uint8)  # (65536,)
        self.threshold = torch.cat([mid, mid.new_full((1,), math.inf)])[base]  # (65536,)

    def quantize_(self, x: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor) -> None:
        """Write the codes of ``x`` into ``q`` and its block scales into ``absmax``; ``x`` is overwritten.

        Args:
            x: (blocks, block_size) float32, contiguous; left holding ``x / absmax``.
            q: (n,) uint8, n <= x.numel(): codes of the first n elements (the rest is padding).
            absmax: (blocks,) float32.
        """
        torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_(), out=absmax)  # max |x| per block
        # An all-zero block divides 0 by a tiny scale: every element maps to the code nearest 0.
        x.div_(absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None])  # in [-1, 1]
        normed = x.view(-1)[: q.numel()]
        key = normed.view(torch.uint16)[_HIGH_HALF::2].to(torch.int32)  # (n,) top 16 bits, 0..65535
        above = normed > self.threshold.index_select(0, key)  # (n,) bool
        torch.add(self.base.index_select(0, key), above, out=q)

    def dequantize_(self, q: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = code[q] * absmax`` per block, in place; returns ``out``.

        Args:
            q: (n,) uint8 codes; they fill the first n elements of ``out``.
            absmax: (blocks,) float32 scales.
            out: (blocks * block_size,) float32; the padding after the first n is zeroed.
        """
        n = q.numel()
        torch.index_select(self.code, 0, q.int(), out=out[:n])
        out[n:] = 0.0
        return out.view(absmax.numel(), -1).mul_(absmax[:, None]).view(-1)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code quantization of each row of ``x`` scaled by the row's absmax.

    Args:
        x: (blocks, block_size) float32.
        code: (256,) ascending float32 map.

    Returns:
        ``(q, absmax)``: (blocks, block_size) uint8 indices into ``code`` and (blocks,)
        float32 scales, such that ``x ~= code[q] * absmax[:, None]``.
    """
    q = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    work = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # quantize_ overwrites it
    NearestCode(code).quantize_(work, q.view(-1), absmax)
    return q, absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``code[q] * absmax[:, None]``: (blocks, block_size) uint8 -> float32."""
    return code[q.long()] * absmax[:, None]


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101) with 8-bit blockwise states.

    With g the gradient at step t, lr the learning rate and wd the weight decay:

        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g^2
        p = p * (1 - lr * wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    the same update as ``torch.optim.AdamW``, with m and v stored as 8-bit codes plus one
    fp32 absmax per ``block_size`` elements (about 2 bytes of state per parameter, against
    8 for fp32 AdamW). Parameters may be fp32, fp16 or bf16; the arithmetic is fp32.

    State per parameter (all tensors or ints, so checkpoints need no pickle):
        ``step`` (int); 8-bit: ``exp_avg``, ``exp_avg_sq`` (numel,) uint8 codes and
        ``exp_avg_absmax``, ``exp_avg_sq_absmax`` (blocks,) float32;
        fp32 (numel < ``min_8bit_size``): ``exp_avg``, ``exp_avg_sq`` shaped like the
        parameter, float32.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate.
        betas: decay rates (b1, b2) of the first and second moment.
        eps: added to the denominator for stability.
        weight_decay: decoupled weight decay, applied as ``p *= 1 - lr * wd``.
        block_size: elements per quantization block (bitsandbytes 0.45+ uses 256).
        min_8bit_size: tensors with fewer elements keep fp32 states.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, block_size: int = 2048,
                 min_8bit_size: int = 4096):
        if lr < 0.0:
            raise ValueError(f"AdamW8bit: lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW8bit: betas must lie in [0, 1), got {betas}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"AdamW8bit: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        if block_size < 1:
            raise ValueError(f"AdamW8bit: block_size must be positive, got {block_size}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        block_size=block_size, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self._codes: dict[torch.device, tuple[NearestCode, NearestCode]] = {}

    def _codes_on(self, device: torch.device) -> tuple[NearestCode, NearestCode]:
        """The (signed, unsigned) dynamic maps and their lookup tables on ``device``, built once."""
        if device not in self._codes:
            self._codes[device] = (NearestCode(dynamic_map(True).to(device)),
                                   NearestCode(dynamic_map(False).to(device)))
        return self._codes[device]

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, group, state)
                state["step"] += 1
                self._update(p, group, state)
        return loss

    def _init_state(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """Zero moments: 8-bit codes + absmax for large tensors, fp32 for small ones."""
        state["step"] = 0
        if p.numel() < group["min_8bit_size"]:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            return
        blocks = math.ceil(p.numel() / group["block_size"])
        for name in ("exp_avg", "exp_avg_sq"):
            # absmax 0 makes every code dequantize to 0, whatever the code.
            state[name] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
            state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)

    def _update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        """Apply one step to ``p`` in chunks of whole blocks, then write ``p`` back."""
        param = p.detach()
        work = param if param.is_contiguous() else param.contiguous()
        flat_p, flat_g = work.view(-1), p.grad.detach().reshape(-1)
        quantized = state["exp_avg"].dtype == torch.uint8
        size = group["block_size"] * max(1, _CHUNK_ELEMENTS // group["block_size"])
        for start in range(0, flat_p.numel(), size):
            chunk = slice(start, start + size)
            if quantized:
                self._update_8bit(flat_p[chunk], flat_g[chunk], group, state, chunk)
            else:
                m, v = state["exp_avg"].view(-1)[chunk], state["exp_avg_sq"].view(-1)[chunk]
                self._adamw(flat_p[chunk], flat_g[chunk], m, v, group, state["step"])
        if work is not param:
            param.copy_(work)

    def _update_8bit(self, p: torch.Tensor, g: torch.Tensor, group: dict, state: dict,
                     chunk: slice) -> None:
        """Dequantize this chunk's states, step, quantize them back in place."""
        books = dict(zip(("exp_avg", "exp_avg_sq"), self._codes_on(p.device)))  # m signed, v unsigned
        bs, n = group["block_size"], p.numel()
        blocks = slice(chunk.start // bs, chunk.start // bs + math.ceil(n / bs))
        padded = (blocks.stop - blocks.start) * bs  # the last block of a tensor may be short
        m, v = (book.dequantize_(state[name][chunk], state[f"{name}_absmax"][blocks],
                                 torch.empty(padded, dtype=torch.float32, device=p.device))
                for name, book in books.items())  # (padded,) each, zero after n: padding never raises an absmax
        self._adamw(p, g, m[:n], v[:n], group, state["step"])
        for (name, book), value in zip(books.items(), (m, v)):
            book.quantize_(value.view(-1, bs), state[name][chunk], state[f"{name}_absmax"][blocks])

    @staticmethod
    def _adamw(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
               group: dict, step: int) -> None:
        """The fp32 AdamW update of one chunk; ``m``, ``v`` fp32, updated in place."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        g32, p32 = g.float(), p.float()  # views when already fp32
        m.mul_(beta1).add_(g32, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        denom = v.sqrt().div_(math.sqrt(1.0 - beta2**step)).add_(eps)
        p32.mul_(1.0 - lr * wd)
        p32.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))
        if p32.data_ptr() != p.data_ptr():
            p.copy_(p32)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()``, keeping the saved dtypes of the states.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating state to the
        parameter's dtype (uint8 codes would become floats, fp32 scales bf16); this
        restores each state tensor exactly as saved, on the parameter's device.
        """
        saved = {index: dict(s) for index, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, values in saved.items():
            p = params[int(index)]
            self.state[p] = {key: value.to(p.device, copy=True) if torch.is_tensor(value) else value
                             for key, value in values.items()}
