"""loralite.nf4 against bitsandbytes (CPU) and the format's definition.

bitsandbytes is the reference for what it gets right on every CPU: codebooks, packed bytes,
scales and the JSON state. Dequantized values are checked against the format's definition
(``conftest.dequantize_by_definition``), because bitsandbytes 0.50.2's CPU dequantize takes a
different kernel by SIMD level and its AVX-512 one is wrong for blocks that span rows.
"""

import json

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from conftest import dequantize_by_definition  # noqa: E402
from loralite import nf4  # noqa: E402

# The 16 NF4 values published in the QLoRA paper's appendix and hard-coded in bitsandbytes.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


@pytest.fixture(autouse=True)
def _no_torch_compile():
    # bitsandbytes dequantizes odd-width tensors through torch.compile'd code; compiling costs
    # seconds per shape on CPU and changes no value, so run it eagerly.
    with torch.compiler.set_stance("force_eager"):
        yield


def bnb_quantize(w, blocksize, double_quant, quant_type):
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                                 quant_type=quant_type)
    return packed, state


def bnb_state_dict(packed, state, prefix="weight"):
    sd = {prefix: packed}
    sd.update({f"{prefix}.{k}": v for k, v in state.as_dict(packed=True).items()})
    return sd


def by_definition(packed, state):
    """The values bitsandbytes' stored tensors encode, from the format's definition."""
    return dequantize_by_definition(bnb_state_dict(packed, state), "weight")


def test_nf4_codebook_derived_equals_published_values():
    assert torch.equal(nf4.NF4_CODE, torch.tensor(PUBLISHED_NF4, dtype=torch.float32))
    assert nf4.NF4_CODE[7] == 0.0  # an exact zero
    assert (nf4.NF4_CODE > 0).sum() == 8 and (nf4.NF4_CODE < 0).sum() == 7  # asymmetric halves


def test_fp4_and_dynamic_maps_equal_bitsandbytes():
    assert torch.equal(nf4.FP4_CODE, bnb_functional.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(nf4.DYNAMIC_CODE, bnb_functional.create_dynamic_map(signed=True))
    assert torch.equal(nf4.codebook("nf4"), bnb_functional.get_4bit_type("nf4", device="cpu"))


SHAPES = [(64, 64), (33, 17), (7,), (3, 5, 9), (130, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_byte_identical_to_bitsandbytes(dtype, quant_type, double_quant, blocksize):
    gen = torch.Generator().manual_seed(blocksize + double_quant)
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen).to(dtype)
        packed, state = bnb_quantize(w, blocksize, double_quant, quant_type)
        q = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
        ours, theirs = q.to_bnb_state_dict("weight"), bnb_state_dict(packed, state)
        assert list(ours) == list(theirs)
        for key in theirs:
            assert ours[key].dtype == theirs[key].dtype, key
            assert ours[key].shape == theirs[key].shape, key
            assert torch.equal(ours[key], theirs[key]), (shape, key)
        expected = by_definition(packed, state)
        assert q.dequantize().dtype == expected.dtype == dtype
        assert torch.equal(q.dequantize(), expected), shape


@pytest.mark.parametrize("blocksize", [32, 512, 4096])
def test_other_blocksizes_and_padding(blocksize):
    w = torch.randn(5, 1001)  # odd size: one padding nibble, partial last block
    packed, state = bnb_quantize(w, blocksize, True, "nf4")
    q = nf4.quantize(w, blocksize=blocksize)
    assert q.data.numel() == (w.numel() + 1) // 2
    assert torch.equal(q.data, packed.view(-1))
    assert torch.equal(q.dequantize(), by_definition(packed, state))


def test_chunked_quantization_is_byte_identical(monkeypatch):
    """Large weights are quantized a few blocks at a time; the bytes must not change."""
    monkeypatch.setattr(nf4, "_CHUNK_ELEMENTS", 256)
    w = torch.randn(37, 333)  # 48 chunks of 256, the last one odd with a partial block
    packed, state = bnb_quantize(w, 64, True, "nf4")
    q = nf4.quantize(w, blocksize=64)
    assert torch.equal(q.data, packed.view(-1))
    assert torch.equal(q.dequantize(), by_definition(packed, state))


@pytest.mark.parametrize("shape, blocksize", [((64, 64), 128), ((64, 64), 256), ((64, 96), 64)])
def test_dequantize_follows_the_format_where_bitsandbytes_cpu_does_not(shape, blocksize):
    """Rows whose length is not a multiple of the blocksize, so blocks span rows.

    bitsandbytes 0.50.2's AVX-512 CPU kernel (``cdequantize_blockwise_cpu_nf4_*``, taken when
    torch reports AVX512 and the rows are of even length) indexes the scales row by row, as if
    every row held whole blocks; here most values get another block's absmax (max error 1.0-2.0
    on an N(0, 1) weight, against under 0.5 for the right scales). Its AVX2 path gets them
    right. loralite must equal the definition on every CPU, whichever path bitsandbytes takes.
    """
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed, state = bnb_quantize(w, blocksize, True, "nf4")
    q = nf4.quantize(w, blocksize=blocksize)
    assert torch.equal(q.data, packed.view(-1))  # the bytes: bitsandbytes gets them right everywhere
    expected = by_definition(packed, state)
    assert torch.equal(q.dequantize(), expected)
    assert (expected - w).abs().max() < 0.5  # within half the widest gap between codes (0.28 x absmax)


def test_high_nibble_holds_the_first_element():
    w = torch.tensor([1.0, -1.0, 0.0])  # codes 15, 0, 7 (+ a 0.0 pad -> 7)
    q = nf4.quantize(w, blocksize=64, double_quant=False)
    assert q.data.tolist() == [0xF0, 0x77]


def test_zero_blocks_and_constant_scales_match_bitsandbytes():
    w = torch.zeros(4, 256)
    w[1] = 3.0  # equal absmaxes make absmax - mean exactly 0 in some nested blocks
    w[3, 5] = -2.0
    for double_quant in (True, False):
        packed, state = bnb_quantize(w, 64, double_quant, "nf4")
        q = nf4.quantize(w, blocksize=64, double_quant=double_quant)
        ours, theirs = q.to_bnb_state_dict(), bnb_state_dict(packed, state)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        assert torch.equal(q.dequantize(), by_definition(packed, state))


def test_nested_8bit_quantizer_matches_bitsandbytes_on_a_dense_grid():
    # Every bin of bitsandbytes' 65536-entry lookup table, and the values next to its edges.
    grid = torch.cat([torch.tensor([1.0]), torch.linspace(-1, 1, 300_001)])
    codes, absmax = nf4._quantize_8bit_dynamic(grid, blocksize=grid.numel())
    expected_codes, state = bnb_functional.quantize_blockwise(grid, blocksize=grid.numel())
    assert torch.equal(codes, expected_codes) and torch.equal(absmax, state.absmax)


def test_json_state_is_bitsandbytes_packed_quant_state():
    w = torch.randn(48, 80, dtype=torch.bfloat16)
    packed, state = bnb_quantize(w, 64, True, "nf4")
    q = nf4.quantize(w)
    raw = q.to_bnb_state_dict("w")["w.quant_state.bitsandbytes__nf4"]
    expected = state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    assert torch.equal(raw, expected)
    assert json.loads(bytes(raw.tolist())) == {
        "quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [48, 80],
        "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": q.offset,
    }


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_state_dict_loads(double_quant, quant_type):
    w = torch.randn(96, 72, dtype=torch.float16)
    packed, state = bnb_quantize(w, 128, double_quant, quant_type)
    q = nf4.NF4Tensor.from_bnb_state_dict(bnb_state_dict(packed, state, "layer.weight"), "layer.weight")
    assert (q.shape, q.dtype, q.blocksize, q.quant_type, q.double_quant) == (w.shape, w.dtype, 128, quant_type,
                                                                             double_quant)
    assert torch.equal(q.dequantize(), by_definition(packed, state))


def test_round_trip_through_own_state_dict():
    q = nf4.quantize(torch.randn(40, 64))
    q2 = nf4.NF4Tensor.from_bnb_state_dict(q.to_bnb_state_dict("x"), "x")
    assert torch.equal(q2.dequantize(), q.dequantize()) and q2.offset == q.offset


def test_missing_key_names_the_key():
    sd = nf4.quantize(torch.randn(8, 64)).to_bnb_state_dict("lin.weight")
    del sd["lin.weight.nested_absmax"]
    with pytest.raises(ValueError, match="lin.weight.nested_absmax"):
        nf4.NF4Tensor.from_bnb_state_dict(sd, "lin.weight")
    with pytest.raises(ValueError, match="quant_state"):
        nf4.NF4Tensor.from_bnb_state_dict({}, "other.weight")


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        nf4.quantize(torch.randn(64), quant_type="int4")
    with pytest.raises(ValueError, match="float"):
        nf4.quantize(torch.arange(64))


def test_statistical_error_as_bitsandbytes_tests_it():
    # bitsandbytes' test_4bit_quant: mean |error| of a 1024x1024 randn at blocksize 64 is ~0.072 for NF4.
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    err = (nf4.quantize(w, blocksize=64).dequantize() - w).abs().mean().item()
    assert 0.070 < err < 0.075
    rel = ((nf4.quantize(w, blocksize=64).dequantize() - w).abs() / (w.abs() + 1e-8)).mean().item()
    assert rel < 0.30
    fp4_err = (nf4.quantize(w, blocksize=64, quant_type="fp4").dequantize() - w).abs().mean().item()
    assert err < fp4_err < 0.12  # NF4 beats FP4 on normal data


def test_nbytes_is_4_127_bits_per_weight():
    q = nf4.quantize(torch.randn(1024, 4096, dtype=torch.bfloat16), blocksize=64)
    codebooks = 8 * (256 + 16) * 4 / q.numel  # the nested map and the NF4 map, fixed per tensor
    assert 8 * q.nbytes / q.numel == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + codebooks)  # 4.127 + codebooks
    plain = nf4.quantize(torch.randn(1024, 1024), blocksize=64, double_quant=False)
    assert 8 * plain.nbytes / plain.numel == pytest.approx(4.5, abs=0.001)


def test_to_device_and_dtype_override():
    q = nf4.quantize(torch.randn(16, 64, dtype=torch.bfloat16))
    moved = q.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.dequantize(), q.dequantize())
    assert q.to("meta").data.device.type == "meta"
    assert q.dequantize(torch.float32).dtype == torch.float32
    assert torch.equal(q.dequantize(torch.float32).to(torch.bfloat16), q.dequantize())
