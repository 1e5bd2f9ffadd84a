"""The Triton kernels (loralite.kernels) against the NF4 reference.

On a machine without CUDA the kernels run on CPU tensors in Triton's interpreter: the
environment variable must be set before ``triton.jit`` decorates them, i.e. before
``loralite.kernels`` is first imported. With CUDA they are compiled and run on the GPU.
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton  # noqa: E402

from loralite import kernels, nf4  # noqa: E402
from loralite.kernels.nf4_matmul import fuses  # noqa: E402
from loralite.quantize import Linear4bit, NF4Config  # noqa: E402

# Error allowed against the float64 product of the same (dtype-rounded) x and W: one rounding
# of the output to its dtype (relative), plus float32 accumulation (absolute, outputs ~ sqrt(K)).
TOLERANCE = {
    torch.bfloat16: dict(rtol=2**-8, atol=1e-3),
    torch.float16: dict(rtol=2**-10, atol=1e-3),
    torch.float32: dict(rtol=1e-5, atol=1e-4),
}
# M -> (weight (out, in), leading shape of x): Llama-like shapes scaled down for the interpreter,
# up/gate proj and down proj (intermediate ~ 2.7x hidden); K = 176 and 72 are not multiples
# of the 64-element quantization block, so blocks span rows and the kernels' fallback (Triton
# dequantize, then a matmul) serves them.
MATMUL_CASES = {1: ((176, 64), (1,)), 5: ((64, 176), (5,)), 130: ((40, 72), (2, 65))}
# Shapes the fused kernel takes (rows of whole blocks): partial tiles in every dimension
# (N = 40, K = 192 is not a multiple of 128-wide tiles), and blocksizes above the 64-wide tiles.
FUSED_CASES = [((40, 192), 64, 1), ((40, 192), 64, 37), ((96, 256), 128, 5), ((48, 512), 256, 130),
               ((64, 128), 64, 20)]


def test_kernels_run_where_expected():
    assert triton.knobs.runtime.interpret == (DEVICE == "cpu")


def _weight(shape, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.02
    w[0, :8] = 0.0  # a stretch of zeros (exact codes, and absmax 0 for tiny blocks)
    return w.to(dtype).to(DEVICE)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 160), (33, 65), (300, 256)])
def test_dequantize_is_bit_identical(shape, quant_type, double_quant):
    q = nf4.quantize(_weight(shape, dtype=torch.bfloat16), 64, double_quant, quant_type)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(kernels.nf4_dequantize(q, dtype), q.dequantize(dtype)), dtype
    assert kernels.nf4_dequantize(q).dtype == torch.bfloat16


def test_dequantize_other_blocksizes_and_odd_numel():
    for blocksize, shape in [(128, (7, 99)), (256, (3, 700)), (64, (1, 1))]:
        q = nf4.quantize(_weight(shape), blocksize, True)
        assert torch.equal(kernels.nf4_dequantize(q), q.dequantize())


def _exact(a, w):
    """a @ w in float64, from the already-rounded operands."""
    return (a.double() @ w.double()).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 5, 130])
def test_matmul_and_its_transpose(m, dtype):
    (n, k), leading = MATMUL_CASES[m]
    q = nf4.quantize(_weight((n, k), seed=m), 64, double_quant=True)
    w = q.dequantize(dtype)  # (n, k), the reference weight
    x = torch.randn(*leading, k, device=DEVICE).to(dtype)
    y = kernels.nf4_matmul(x, q)
    assert y.shape == (*leading, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), _exact(x, w.T), **TOLERANCE[dtype])
    g = torch.randn(*leading, n, device=DEVICE).to(dtype)
    dx = kernels.nf4_matmul_t(g, q)
    assert dx.shape == x.shape and dx.dtype == dtype
    torch.testing.assert_close(dx.float(), _exact(g, w), **TOLERANCE[dtype])


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, blocksize, m", FUSED_CASES)
def test_fused_matmul_and_its_transpose(shape, blocksize, m, quant_type, double_quant):
    q = nf4.quantize(_weight(shape, seed=m), blocksize, double_quant, quant_type)
    assert fuses(q)
    for dtype in (torch.bfloat16, torch.float32):
        w = q.dequantize(dtype)  # (n, k)
        x = torch.randn(m, shape[1], device=DEVICE).to(dtype)
        torch.testing.assert_close(kernels.nf4_matmul(x, q).float(), _exact(x, w.T), **TOLERANCE[dtype])
        g = torch.randn(m, shape[0], device=DEVICE).to(dtype)
        torch.testing.assert_close(kernels.nf4_matmul_t(g, q).float(), _exact(g, w), **TOLERANCE[dtype])


def test_blocks_spanning_rows_take_the_fallback():
    assert not fuses(nf4.quantize(_weight((40, 72)), 64)) and fuses(nf4.quantize(_weight((40, 128)), 64))
    assert not fuses(nf4.quantize(_weight((4, 64)), 128))


@pytest.mark.parametrize("m", [1, 130])
def test_matmul_without_double_quant(m):
    q = nf4.quantize(_weight((96, 96)), 64, double_quant=False)
    x = torch.randn(m, 96, device=DEVICE).bfloat16()
    torch.testing.assert_close(kernels.nf4_matmul(x, q).float(), _exact(x, q.dequantize(torch.bfloat16).T),
                               **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("m", [3, 40])
def test_gradients_of_linear4bit_through_the_kernels(m, monkeypatch):
    """Linear4bit's autograd Function on the Triton path: forward x @ W.T + b, backward g @ W."""
    monkeypatch.setenv("LORALITE_KERNELS", "triton")
    torch.manual_seed(m)
    linear = torch.nn.Linear(72, 40, device=DEVICE)
    layer = Linear4bit.from_linear(linear, NF4Config(compute_dtype=torch.float32))
    x = torch.randn(2, m, 72, device=DEVICE, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.weight.dequantize(torch.float32)
    torch.testing.assert_close(y, _exact(x.detach(), w.T) + linear.bias.detach(), **TOLERANCE[torch.float32])
    torch.testing.assert_close(x.grad, _exact(g, w), **TOLERANCE[torch.float32])


def test_empty_batch():
    q = nf4.quantize(_weight((40, 72)), 64)
    assert kernels.nf4_matmul(torch.zeros(0, 72, device=DEVICE), q).shape == (0, 40)


def test_bad_inputs_raise_value_errors():
    q = nf4.quantize(_weight((40, 72)), 64)
    with pytest.raises(ValueError, match="72"):
        kernels.nf4_matmul(torch.zeros(2, 71, device=DEVICE), q)
    with pytest.raises(ValueError, match="int64"):
        kernels.nf4_matmul(torch.zeros(2, 72, dtype=torch.int64, device=DEVICE), q)
    with pytest.raises(ValueError, match="device"):
        kernels.nf4_matmul(torch.zeros(2, 72, device="meta"), q)
