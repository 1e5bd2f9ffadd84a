"""NF4 / FP4 4-bit weights with double quantization, byte-compatible with bitsandbytes.

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) stores a frozen weight W
as 4-bit indices into a 16-value codebook, one float scale per block of ``blocksize``
consecutive elements of the row-major flattened weight:

    absmax[b] = max_{j in block b} |W_j|
    W_j ~= code[nibble_j] * absmax[j // blocksize]

Double quantization stores the block scales themselves in 8 bits: the scales minus their
mean (``offset``) are quantized in blocks of 256 with the signed dynamic map,

    absmax[b] ~= nested_code[absmax_codes[b]] * nested_absmax[b // 256] + offset

which costs 8/64 + 32/(64*256) bits per weight at blocksize 64, 4.127 bits in all.

Two codes share one byte, the first element in the HIGH nibble. Every rounding below
follows bitsandbytes' CPU path so that packed codes, scales and the dequantized values
are byte-identical (checked against bitsandbytes in tests/test_nf4.py).
"""

from __future__ import annotations

import dataclasses
import json

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256  # block scales per 8-bit nested block (bitsandbytes' choice)
_MIN_SCALE = 1e-38  # bitsandbytes clamps a block absmax to this before dividing by it
_LUT_SIZE = 65536  # bins of [-1, 1] in bitsandbytes' 8-bit CPU quantizer


def _normal_map(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 values: quantiles of N(0, 1), normalized to [-1, 1], with an exact zero.

    QLoRA splits the 16 codes asymmetrically: 8 positive quantiles of N(0, 1) at evenly
    spaced probabilities from ``offset`` down to 0.5 (exclusive), 7 negative ones, and 0.
    ``offset`` = 0.9677083 is the outermost probability, so norm.ppf(offset) ~= 1.848 becomes 1.0.
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # (8,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # (7,)
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    values = values.sort().values
    return values / values.max()


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry 8-bit dynamic map (Dettmers, 2015, https://arxiv.org/abs/1511.04561), sorted.

    Double quantization uses the signed map for the block scales; ``AdamW8bit`` uses both.

    For exponent e = 0..6 the decade [10^(e-6), 10^(e-5)) gets the midpoints of an even
    split of [0.1, 1] scaled by 10^(e-6): 2^e values per sign when signed, 2^(e+1) when
    unsigned. Adding 0 and 1 completes 2 * 127 + 2 = 254 + 2 = 256 entries.

    Args:
        signed: the map for signed values (first moment) or for non-negative values
            (second moment).

    Returns:
        (256,) float32, ascending; equal to ``bitsandbytes.functional.create_dynamic_map``.
    """
    values = [0.0, 1.0]
    for exponent in range(7):
        count = 2**exponent if signed else 2 ** (exponent + 1)
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0  # (count,) in [0.1, 1]
        decade = (10 ** (exponent - 6)) * means
        values += decade.tolist()
        if signed:
            values += (-decade).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), indexed by nibble, divided by
# its largest magnitude 12. Bit 3 is the sign; the other 3 bits follow bitsandbytes' table.
_FP4_VALUES = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]

NF4_CODE = _normal_map()  # (16,) float32, sorted: nibble i -> value
FP4_CODE = torch.tensor(_FP4_VALUES, dtype=torch.float32) / 12.0  # (16,) nibble i -> value
DYNAMIC_CODE = dynamic_map(signed=True)  # (256,) float32, sorted: byte i -> value


def codebook(quant_type: str) -> torch.Tensor:
    """The (16,) float32 codebook (``quant_map``) of ``quant_type`` ("nf4" or "fp4")."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return (NF4_CODE if quant_type == "nf4" else FP4_CODE).clone()


def _block_absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax of ``flat`` (float32, 1-D) and every element divided by its block's absmax.

    As bitsandbytes: full blocks multiply by the reciprocal of the (clamped) absmax; a partial
    last block divides by its absmax, which is stored clamped.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_MIN_SCALE))[:, None]).clamp(-1, 1).view(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=_MIN_SCALE)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    return absmax, scaled


def decision_boundaries(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, midpoints): sorted position -> nibble (identity for NF4), and the (15,) float32
    boundaries between consecutive sorted codes."""
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    return order, (sorted_code[:-1] + sorted_code[1:]) / 2


def _nearest_4bit(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code of each value in [-1, 1]; a tie goes to the smaller code."""
    order, midpoints = decision_boundaries(code)
    return order[torch.bucketize(scaled, midpoints)].to(torch.uint8)


def quantize_blocks(flat: torch.Tensor, blocksize: int, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: (absmax float32 per block, packed uint8 codes) of the 1-D ``flat``.

    Whole blocks, ~4M elements at a time, so the float32 temporaries stay small (16 MB each)
    however large the weight: quantizing while loading a 7B model must not spike.
    """
    chunk = blocksize * max(1, _CHUNK_ELEMENTS // blocksize)
    absmax_parts, data_parts = [], []
    for start in range(0, flat.numel(), chunk):
        absmax, scaled = _block_absmax_and_scaled(flat[start:start + chunk].float(), blocksize)
        codes = _nearest_4bit(torch.nn.functional.pad(scaled, (0, scaled.numel() % 2)), code)  # odd: pad 0.0
        absmax_parts.append(absmax)
        data_parts.append(_pack_nibbles(codes))
    return torch.cat(absmax_parts), torch.cat(data_parts)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(2m,) uint8 codes < 16 -> (m,) bytes, element 2i in the high nibble, 2i + 1 in the low."""
    return (codes[0::2] << 4) | codes[1::2]


def _quantize_8bit_dynamic(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization of float32 ``x`` with the signed dynamic map.

    Rounds exactly as bitsandbytes' CPU kernel: each value times the reciprocal of its
    block absmax is looked up in a 65536-bin table of [-1, 1] holding the nearest code of
    each bin's left edge (a tie goes to the smaller code); an all-zero block gets code 0.
    The bins are 3e-5 wide, so within ~2e-5 of 0 this is coarser than the true nearest code
    (bitsandbytes' CUDA kernel searches exactly); the difference is below the 4-bit error.

    Returns:
        (codes uint8 (n,), absmax float32 (ceil(n / blocksize),)).
    """
    n = x.numel()
    padded = torch.nn.functional.pad(x, (0, -n % blocksize)).view(-1, blocksize)  # zeros leave absmax alone
    absmax = padded.abs().amax(dim=1)  # (blocks,)
    inverse = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # an all-zero block scales to 0, not NaN
    scaled = (padded * inverse[:, None]).clamp(-1.0, 1.0)
    bins = (((scaled + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).long()  # truncation of a positive value
    codes = _DYNAMIC_LUT.to(bins.device)[bins]
    codes[absmax == 0] = 0
    return codes.view(-1)[:n], absmax


def _dynamic_lut() -> torch.Tensor:
    """(65536,) uint8: the nearest dynamic-map code of each bin edge -1 + 2 i / 65535."""
    midpoints = 0.5 * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])  # (255,)
    edges = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, edges).to(torch.uint8)  # count of midpoints < edge


_DYNAMIC_LUT = _dynamic_lut()  # (65536,) uint8
_CHUNK_ELEMENTS = 2**22  # elements quantized per step (a multiple of every blocksize)


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4") -> NF4Tensor:
    """Quantize a float tensor to 4 bits per element, blockwise over its row-major flattening.

    Args:
        w: float32, float16 or bfloat16 tensor of any shape (a Linear weight is (out, in)).
        blocksize: elements per absmax block, a power of two in 32..4096.
        double_quant: also quantize the block absmaxes to 8 bits (QLoRA's double quantization).
        quant_type: "nf4" (NormalFloat) or "fp4".

    Returns:
        The NF4Tensor; ``quantize(w).dequantize()`` equals bitsandbytes' round trip bit for bit.
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    code = codebook(quant_type).to(w.device)  # the quantizer compares on w's device (CUDA too)
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize expects a float32/float16/bfloat16 tensor, got {w.dtype}")
    flat = w.detach().reshape(-1)
    from loralite import ops  # ops imports this module: the dispatch is looked up at call time

    absmax, data = ops.quantize_blocks(flat, blocksize, code)
    q = NF4Tensor(
        data=data, absmax=absmax, nested_absmax=None, nested_code=None, offset=0.0,
        code=code.to(w.device), shape=w.shape, dtype=w.dtype, blocksize=blocksize, quant_type=quant_type,
    )
    if double_quant:
        if not absmax.is_meta and not bool(torch.isfinite(absmax).all()):
            bad = int((~torch.isfinite(absmax)).sum())
            raise ValueError(f"quantize: {bad} of {absmax.numel()} blocks of this weight hold inf or NaN; double "
                             "quantization needs finite block scales: fix the weight, or use double_quant=False")
        offset = absmax.mean()  # float32, as bitsandbytes computes it
        absmax_codes, nested_absmax = _quantize_8bit_dynamic(absmax - offset)
        q = dataclasses.replace(
            q, absmax=absmax_codes, nested_absmax=nested_absmax, nested_code=DYNAMIC_CODE.to(w.device),
            offset=0.0 if offset.is_meta else offset.item(),  # a meta model is sized, not computed
        )
    return q


def _byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) float32: byte b -> (code[b >> 4], code[b & 15]), the two values it packs."""
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1)


@dataclasses.dataclass(frozen=True)
class NF4Tensor:
    """A 4-bit blockwise-quantized tensor in bitsandbytes' layout (see the module docstring)."""

    data: torch.Tensor  # uint8 (numel + 1) // 2: two codes per byte, first element in the high nibble
    absmax: torch.Tensor  # float32 per block, or uint8 codes into nested_code when double-quantized
    nested_absmax: torch.Tensor | None  # float32 per 256 block scales, None without double quant
    nested_code: torch.Tensor | None  # float32 (256,) signed dynamic map, None without double quant
    offset: float  # mean of the block absmaxes, added back after the nested lookup; 0.0 without
    code: torch.Tensor  # float32 (16,) codebook (bitsandbytes' quant_map), nibble -> value
    shape: torch.Size  # shape of the original tensor
    dtype: torch.dtype  # dtype of the original tensor, the default of dequantize()
    blocksize: int  # elements per absmax block
    quant_type: str  # "nf4" or "fp4"

    @property
    def double_quant(self) -> bool:
        """Whether the block absmaxes are themselves 8-bit quantized."""
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def rows_hold_whole_blocks(self) -> bool:
        """Whether each row of a 2-D weight is a whole number of quantization blocks (K % blocksize
        == 0), so a row's codes start on a byte and its scales on a block: what a tiled decode needs."""
        return len(self.shape) == 2 and self.shape[1] % self.blocksize == 0

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held: packed codes, scales, nested scales and both codebooks."""
        tensors = [self.data, self.absmax, self.code, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (dequantizing the nested 8-bit codes if present)."""
        if not self.double_quant:
            return self.absmax
        n = self.absmax.numel()
        values = self.nested_code.index_select(0, self.absmax.int())
        values = torch.nn.functional.pad(values, (0, -n % NESTED_BLOCKSIZE)).view(-1, NESTED_BLOCKSIZE)
        return (values * self.nested_absmax[:, None]).view(-1)[:n] + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor: ``code[nibble_j] * absmax[j // blocksize]``, computed in float32.

        Args:
            dtype: output dtype, default the original dtype; the float32 product is rounded
                to it once (round to nearest even), as bitsandbytes does.
        """
        # One 8-byte gather per packed byte: the (256, 2) float32 pair table viewed as (256,) int64.
        pairs = _byte_pair_table(self.code).view(torch.int64).view(-1)
        values = pairs.index_select(0, self.data.int()).view(torch.float32)  # (2 * bytes,)
        n = self.numel
        blocks = -(-n // self.blocksize)
        if values.numel() != blocks * self.blocksize:  # partial last block
            values = torch.nn.functional.pad(values[:n], (0, blocks * self.blocksize - n))
        out = torch.empty(blocks, self.blocksize, dtype=dtype or self.dtype, device=values.device)
        torch.mul(values.view(blocks, self.blocksize), self.block_absmax()[:, None], out=out)  # fp32 product, one rounding
        return out.view(-1)[:n].view(self.shape)

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy with every tensor on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self, data=move(self.data), absmax=move(self.absmax), nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code), code=move(self.code),
        )

    def quant_state_json(self) -> dict:
        """The non-tensor quantization state, keyed and ordered as bitsandbytes packs it."""
        state = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset)
        return state

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' ``Linear4bit`` saves under ``prefix``, byte for byte.

        Keys: ``prefix`` (uint8 (bytes, 1)), ``.absmax``, ``.quant_map``, and with double
        quantization ``.nested_absmax``, ``.nested_quant_map``; then
        ``.quant_state.bitsandbytes__<quant_type>``, the JSON state as uint8 bytes.
        """
        state = {prefix: self.data.view(-1, 1), f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.double_quant:
            state[f"{prefix}.nested_absmax"] = self.nested_absmax
            state[f"{prefix}.nested_quant_map"] = self.nested_code
        packed = json.dumps(self.quant_state_json()).encode("utf-8")
        state[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(packed), dtype=torch.uint8, device=self.device
        )
        return state

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Tensor:
        """Read the tensors bitsandbytes saved under ``prefix`` (see ``to_bnb_state_dict``).

        Raises:
            ValueError: a key is missing, or the packed state is not a bitsandbytes 4-bit state.
        """
        state_keys = [f"{prefix}.quant_state.bitsandbytes__{t}" for t in QUANT_TYPES]
        found = [k for k in state_keys if k in sd]
        if len(found) != 1:
            raise ValueError(f"expected exactly one of {state_keys} in the state dict, found {found}")
        state = json.loads(bytes(sd[found[0]].cpu().tolist()).decode("utf-8"))
        quant_type = state["quant_type"]
        dtype = getattr(torch, state["dtype"], None)
        if quant_type not in QUANT_TYPES or dtype not in FLOAT_DTYPES or state["blocksize"] not in BLOCKSIZES:
            raise ValueError(f"{found[0]}: unsupported quantization state {state}")
        data = _required(sd, prefix)
        if data.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: the same bytes
            data = data.contiguous().view(torch.uint8)
        double_quant = "nested_offset" in state
        return cls(
            data=data.reshape(-1),
            absmax=_required(sd, f"{prefix}.absmax"),
            nested_absmax=_required(sd, f"{prefix}.nested_absmax") if double_quant else None,
            nested_code=_required(sd, f"{prefix}.nested_quant_map") if double_quant else None,
            offset=float(state["nested_offset"]) if double_quant else 0.0,
            code=_required(sd, f"{prefix}.quant_map").float(),
            shape=torch.Size(state["shape"]),
            dtype=dtype,
            blocksize=state["blocksize"],
            quant_type=quant_type,
        )


def _required(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"bitsandbytes 4-bit state dict is missing the key {key!r}")
    return sd[key]
