"""The C++/CUDA sources in csrc/ against the NF4 reference.

The CPU operator is taken from the installed ``loralite._C`` when it was built, otherwise
compiled here with the host compiler straight into a shared library (cached in the temp
folder by source hash) and loaded with ``torch.ops.load_library``. The CUDA sources compile
with ``nvcc -c`` wherever nvcc exists, with or without a GPU; running the GEMV needs a GPU.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest
import torch

from loralite import nf4, ops

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
TORCH_DIR = pathlib.Path(torch.__file__).parent
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def _cached_build(name: str, sources: list[pathlib.Path], command) -> pathlib.Path:
    """Runs ``command(output_path)`` once per content of ``sources``; returns the output path."""
    digest = hashlib.sha256(torch.__version__.encode())
    for source in sources:
        digest.update(source.read_bytes())
    folder = pathlib.Path(tempfile.gettempdir()) / f"loralite-csrc-{digest.hexdigest()[:16]}"
    folder.mkdir(exist_ok=True)
    output = folder / name
    if not output.exists():
        partial = folder / f"{name}.{os.getpid()}.tmp"
        result = subprocess.run(command(partial), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-4000:]
        os.replace(partial, output)
    return output


def _torch_flags() -> list[str]:
    return [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-std=c++20",
            f"-I{TORCH_DIR / 'include'}", f"-I{TORCH_DIR / 'include/torch/csrc/api/include'}"]


def _cpu_operator(name: str):
    """torch.ops.loralite.<name>, from the installed extension or compiled here from csrc/<source>
    with the flags setup.py uses (OpenMP included)."""
    if not hasattr(torch.ops.loralite, name):
        source = CSRC / {"nf4_dequantize": "nf4_cpu.cpp", "nf4_quantize": "nf4_quantize_cpu.cpp", "gemv": "gemv_cpu.cpp", "gemv_group": "gemv_cpu.cpp", "dropout": "dropout_cpu.cpp",
                         "dropout_backward": "dropout_cpu.cpp", "rms_norm": "decode_cpu.cpp", "rotary": "decode_cpu.cpp",
                         "decode_attention": "decode_cpu.cpp"}[name]
        cxx = os.environ.get("CXX", "c++")
        library = _cached_build(source.stem + ".so", [source, *CSRC.glob("*.h")], lambda out: [
            cxx, "-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fopenmp", *_torch_flags(), str(source), "-o",
            str(out), f"-L{TORCH_DIR / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{TORCH_DIR / 'lib'}"])
        torch.ops.load_library(str(library))
    return getattr(torch.ops.loralite, name)


@pytest.fixture(scope="module")
def dequantize_op():
    return _cpu_operator("nf4_dequantize")


def _run(op, q, dtype):
    flat = op(q.data, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, q.blocksize, q.numel, dtype)
    return flat.view(q.shape)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize, shape", [(64, (96, 160)), (64, (33, 65)), (128, (7, 99)),
                                              (256, (300, 256)), (64, (1, 1)), (64, (513, 130))])
def test_cpu_dequantize_equals_reference_bitwise(dequantize_op, blocksize, shape, quant_type, double_quant):
    torch.manual_seed(blocksize + shape[0])
    w = torch.randn(shape) * torch.logspace(-3, 2, shape[1])  # scales spread over 5 decades
    w[0, : shape[1] // 2] = 0.0  # whole blocks of zeros
    q = nf4.quantize(w, blocksize, double_quant, quant_type)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(_run(dequantize_op, q, dtype), q.dequantize(dtype)), dtype


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_cpu_dequantize_large_outputs_stream_and_match(dequantize_op, blocksize):
    """Outputs of 8 MiB and more take the non-temporal stores; still the reference, bit for bit."""
    torch.manual_seed(blocksize)
    w = torch.randn(1024, 2048 + 64) * 0.02  # float32 output 8.5 MiB; bf16 4.3 MiB (cached stores)
    q = nf4.quantize(w, blocksize, double_quant=True)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(_run(dequantize_op, q, dtype), q.dequantize(dtype)), dtype
    misaligned = torch.empty(q.numel + 1)[1:]  # 4 bytes off: no streaming, same numbers
    torch.ops.loralite.nf4_dequantize.out(q.data, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code,
                                          q.blocksize, q.numel, torch.float32, out=misaligned)
    assert torch.equal(misaligned.view(q.shape), q.dequantize(torch.float32))


def test_cpu_dequantize_non_finite_scales_match_the_reference(dequantize_op):
    """Blocks whose scale is inf or NaN (a corrupt file, an overflowed weight) decode like the reference."""
    q = nf4.quantize(torch.randn(4, 256), 64, double_quant=False)
    q.absmax[1], q.absmax[2] = float("inf"), float("nan")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.testing.assert_close(_run(dequantize_op, q, dtype), q.dequantize(dtype), rtol=0, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize, shape", [(64, (96, 160)), (64, (33, 65)), (128, (7, 99)), (4096, (3, 5000)),
                                              (32, (1, 1)), (256, (300, 256))])
def test_cpu_quantize_equals_the_reference_bitwise(monkeypatch, blocksize, shape, quant_type):
    """nf4.quantize through loralite._C and through the reference: the same bytes, every dtype,
    odd counts and partial last blocks, zero blocks, inf and NaN included."""
    _cpu_operator("nf4_quantize")
    monkeypatch.delenv("LORALITE_KERNELS", raising=False)
    calls, real = [], ops._CPU_NF4_QUANTIZE
    if real is not None:  # the installed extension: record that quantize takes it
        monkeypatch.setattr(ops, "_CPU_NF4_QUANTIZE", lambda *args: calls.append(1) or real(*args))
    torch.manual_seed(blocksize + shape[1])
    w = torch.randn(shape) * torch.logspace(-3, 2, shape[1])
    w.view(-1)[: blocksize] = 0.0  # a whole zero block
    broken = w.clone()  # non-finite weights: plain absmax only (8-bit double quant needs finite scales)
    if w.numel() > 3 * blocksize:
        broken.view(-1)[blocksize + 3], broken.view(-1)[2 * blocksize + 5] = float("inf"), float("nan")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for x, double_quant in ((w.to(dtype), True), (broken.to(dtype), False)):
            before = len(calls)
            fast = nf4.quantize(x, blocksize, double_quant=double_quant, quant_type=quant_type)
            assert len(calls) - before == int(ops.HAS_EXTENSION)  # the C++ path when built, once
            with monkeypatch.context() as patch:
                patch.setenv("LORALITE_KERNELS", "reference")
                ref = nf4.quantize(x, blocksize, double_quant=double_quant, quant_type=quant_type)
            assert torch.equal(fast.data, ref.data), (dtype, double_quant)
            torch.testing.assert_close(fast.absmax, ref.absmax, rtol=0, atol=0, equal_nan=True)
            assert fast.offset == ref.offset


def test_cpu_dequantize_out_variant_writes_into_the_buffer(dequantize_op):
    q = nf4.quantize(torch.randn(40, 72), 64)
    out = torch.full((40 * 72,), float("nan"), dtype=torch.bfloat16)
    result = torch.ops.loralite.nf4_dequantize.out(q.data, q.absmax, q.nested_absmax, q.nested_code, q.offset,
                                                   q.code, q.blocksize, q.numel, torch.bfloat16, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out.view(40, 72), q.dequantize(torch.bfloat16))
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.loralite.nf4_dequantize.out(q.data, q.absmax, q.nested_absmax, q.nested_code, q.offset,
                                              q.code, q.blocksize, q.numel, torch.float32, out=out)


def test_cpu_dequantize_is_the_auto_path_when_built(dequantize_op):
    """ops.dequantize on CPU uses the operator exactly when loralite._C is installed."""
    q = nf4.quantize(torch.randn(64, 96), 64)
    assert ops._path(q.data) == ("cpp" if ops.HAS_EXTENSION else "reference")
    assert torch.equal(ops.dequantize(q, torch.bfloat16), _run(dequantize_op, q, torch.bfloat16))


def test_cpu_dequantize_rejects_bad_inputs(dequantize_op):
    q = nf4.quantize(torch.randn(8, 64), 64)
    with pytest.raises(RuntimeError, match="bytes"):
        dequantize_op(q.data[:-1], q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, 64, 512,
                      torch.float32)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _run(dequantize_op, q, torch.int32)


@pytest.fixture(scope="module")
def gemv_op():
    return _cpu_operator("gemv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n, k", [(33, 576), (1000, 45), (7, 8)])  # k % 16: 0, 13 and k < 16
def test_cpu_gemv_matches_f_linear(gemv_op, dtype, rows, n, k):
    """Sums in another order than torch's: equal to F.linear within float32 rounding of the sum."""
    torch.manual_seed(rows * n + k)
    x, w, bias = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
    exact = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    for b in (None, bias):
        y = gemv_op(x, w, b)
        assert y.dtype == dtype and y.shape == (rows, n)
        expected = exact if b is not None else exact - bias.double()
        # float32: the sum's own rounding; bfloat16: one rounding of the output (half an ulp, 2^-9 relative)
        tolerance = 1e-5 * k**0.5 if dtype == torch.float32 else 2**-8
        torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance)


def test_cpu_gemv_keeps_leading_dimensions(gemv_op):
    x, w = torch.randn(2, 1, 40), torch.randn(24, 40)  # a decode step of a batch of 2: (B, T, K)
    y = gemv_op(x, w, None)
    assert y.shape == (2, 1, 24)
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_gemv_group_equals_one_gemv_per_weight(dtype):
    """A layer's q, k, v in one pass: the same numbers as one call per weight, biases or not."""
    op, single = _cpu_operator("gemv_group"), _cpu_operator("gemv")
    torch.manual_seed(7)
    x = torch.randn(2, 1, 96).to(dtype)
    weights = [torch.randn(n, 96).to(dtype) for n in (64, 16, 16, 1)]
    biases = [torch.randn(64).to(dtype), None, torch.randn(16).to(dtype), None]
    outs = op(x, weights, biases)
    assert [tuple(y.shape) for y in outs] == [(2, 1, 64), (2, 1, 16), (2, 1, 16), (2, 1, 1)]
    for y, w, b in zip(outs, weights, biases):
        assert torch.equal(y, single(x, w, b))
    with pytest.raises(RuntimeError, match="one bias"):
        op(x, weights, biases[:-1])
    with pytest.raises(RuntimeError, match=r"\(N, K\)"):
        op(x, [weights[0], torch.randn(4, 95).to(dtype)], [None, None])


def test_cpu_gemv_rejects_bad_inputs(gemv_op):
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        gemv_op(torch.randn(5, 8), w, None)
    with pytest.raises(RuntimeError, match=r"\(\.\.\., K\)"):
        gemv_op(x, torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        gemv_op(x.half(), w.half(), None)
    with pytest.raises(RuntimeError, match="bias"):
        gemv_op(x, w, torch.randn(3))


def _splitmix64(z: int) -> int:
    """SplitMix64 in Python integers: the reference for the operator's random bits."""
    mask = 2**64 - 1
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_masks_are_splitmix64_of_the_index(dtype):
    """Element 2j keeps when the low 32 bits of splitmix64(seed + j) reach p * 2^32, element 2j + 1
    on the high 32 bits: the vector (eight at a time) and scalar paths give these same bits."""
    op = _cpu_operator("dropout")
    seed, p, n = 987654321, 0.3, 3 * 32768 + 1  # odd: the last pair has one element; > 1 task of 16384 pairs
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # tasks start past pair 0: their counters must too
    try:
        _, keep = op(torch.randn(n).to(dtype), p, seed)
    finally:
        torch.set_num_threads(threads)
    expected = []
    for j in range((n + 1) // 2):
        bits = _splitmix64(seed + j)
        expected += [(bits & 0xFFFFFFFF) >= round(p * 2**32), (bits >> 32) >= round(p * 2**32)]
    assert keep.tolist() == expected[:n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_dropout_backward_equals_aten(dtype):
    op = _cpu_operator("dropout_backward")
    grad = torch.randn(7, 1003).to(dtype)  # 7021 elements: vector steps and a scalar tail
    keep = torch.rand(7, 1003) > 0.2
    assert torch.equal(op(grad, keep, 1 / 0.8), torch.ops.aten.native_dropout_backward(grad, keep, 1 / 0.8))
    with pytest.raises(RuntimeError, match="bool mask"):
        op(grad, keep[:, :-1], 1.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_dropout_operator(dtype):
    """Masks depend on (seed, index) only; P(keep) = 1 - p; kept values are x / (1 - p)."""
    op = _cpu_operator("dropout")
    x = torch.randn(3, 50_001).to(dtype)  # odd count: the last pair has one element
    y, keep = op(x, 0.25, 12345)
    assert keep.dtype == torch.bool and keep.shape == x.shape and y.dtype == dtype
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert torch.equal(y, torch.where(keep, (x.float() * (1 / 0.75)).to(dtype), 0))  # float32 scale, one rounding
    assert torch.equal(op(x, 0.25, 12345)[1], keep) and not torch.equal(op(x, 0.25, 12346)[1], keep)
    assert bool(op(x, 0.0, 1)[1].all())
    with pytest.raises(RuntimeError, match="p must be"):
        op(x, 1.0, 1)


def _reference(monkeypatch, fn, *args):
    """``fn(*args)`` on the pure-PyTorch reference path of loralite.ops."""
    with monkeypatch.context() as patch:
        patch.setenv("LORALITE_KERNELS", "reference")
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 64), (2, 7)])
def test_cpu_rms_norm_matches_the_reference(monkeypatch, dtype, shape):
    """Same roundings as ops.rms_norm's reference; only the mean's sum is in another order."""
    op = _cpu_operator("rms_norm")
    torch.manual_seed(shape[-1])
    x, w = (torch.randn(shape) * 3).to(dtype), (1 + torch.randn(shape[-1]) * 0.1).to(dtype)
    y, expected = op(x, w, 1e-5), _reference(monkeypatch, ops.rms_norm, x, w, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, expected, rtol=1e-6 if dtype == torch.float32 else 2**-7, atol=0)
    if dtype != torch.float32:  # the sum's last bit rarely moves a 16-bit rounding
        assert (y == expected).float().mean() > 0.98
    with pytest.raises(RuntimeError, match="weight must be"):
        op(x, w[:-1], 1e-5)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(x, w.double(), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, T, H, hd", [(1, 1, 9, 64), (2, 5, 3, 128), (1, 3, 1, 2)])
def test_cpu_rotary_equals_the_reference_bitwise(monkeypatch, dtype, B, T, H, hd):
    op = _cpu_operator("rotary")
    torch.manual_seed(hd + T)
    x = torch.randn(B, T, H, hd).to(dtype)
    angles = torch.rand(B, T, hd) * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    assert torch.equal(op(x, cos, sin), _reference(monkeypatch, ops.rotary, x, cos, sin))
    one, two = cos[:1], sin[:1]  # (1, T, hd): one table for every sequence
    assert torch.equal(op(x, one, two), _reference(monkeypatch, ops.rotary, x, one, two))
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        op(x, cos[..., :-2], sin[..., :-2])
    with pytest.raises(RuntimeError, match="hd even"):
        op(x[..., :1], cos[..., :1], sin[..., :1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, Hkv, S, hd", [(1, 9, 3, 70, 64), (2, 4, 4, 5, 32), (3, 6, 2, 17, 12)])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_decode_attention_matches_sdpa(dtype, B, H, Hkv, S, hd, masked):
    """One query per sequence over keys and values in a longer cache (strided), GQA, an optional
    padding mask; hd = 12 takes the scalar loop. Against SDPA in float64 on the same inputs."""
    op = _cpu_operator("decode_attention")
    torch.manual_seed(S * H + hd)
    q = torch.randn(B, 1, H, hd).to(dtype)
    k_cache, v_cache = torch.randn(2, B, Hkv, S + 9, hd).to(dtype)  # 9 unfilled positions
    k, v = k_cache[:, :, :S], v_cache[:, :, :S]  # (B, Hkv, S, hd), not contiguous
    keep = torch.rand(B, S) > 0.3 if masked else None
    if keep is not None:
        keep[:, -1] = True  # rows attend to at least their own token ...
        keep[0] = False  # a row that may see nothing: 0, as SDPA gives
    y = op(q, k, v, keep, hd**-0.5)
    assert y.dtype == dtype and y.shape == (B, 1, H, hd)
    mask = None if keep is None else keep[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True).transpose(1, 2)
    if keep is not None:
        assert y[0].abs().sum() == 0 and expected[0].abs().sum() == 0
    # float32: sums of S terms; 16-bit: one rounding of the output
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8 if dtype == torch.float16 else 2**-7
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance)


def test_cpu_decode_attention_rejects_bad_inputs():
    op = _cpu_operator("decode_attention")
    q, kv = torch.randn(1, 1, 4, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(RuntimeError, match=r"q must be \(B, 1, H, hd\)"):
        op(torch.randn(1, 2, 4, 8), kv, kv, None, 1.0)
    with pytest.raises(RuntimeError, match="do not divide"):
        op(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8), None, 1.0)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        op(q, kv, kv, torch.ones(1, 5, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="contiguous in hd"):
        op(q, kv.transpose(2, 3).contiguous().transpose(2, 3), kv, None, 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(q, kv.half(), kv, None, 1.0)


@needs_nvcc
def test_every_cu_file_compiles_with_nvcc():
    for source in sorted(CSRC.glob("*.cu")):
        _cached_build(source.stem + ".o", [source, *CSRC.glob("*.h")], lambda out, source=source: [
            NVCC, "-c", "-O3", "--fmad=false", "-arch=sm_80", f"-I{CSRC}", str(source), "-o", str(out)])


@needs_nvcc
def test_gemv_binding_compiles_against_torch_cuda_headers(tmp_path):
    """The thin torch binding compiles (to an object file) against torch's c10/cuda headers and CUDA's.

    A CPU-only torch ships c10/cuda but not its generated cuda_cmake_macros.h; an empty one
    stands in for it, since the binding uses none of its build switches.
    """
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.touch()
    homes = [os.environ.get("CUDA_HOME", ""), pathlib.Path(NVCC).resolve().parent.parent, "/usr/local/cuda"]
    cuda_include = next(pathlib.Path(home) / "include" for home in homes
                        if home and (pathlib.Path(home) / "include" / "cuda_runtime.h").exists())
    source = CSRC / "nf4_gemv_binding.cpp"
    _cached_build("nf4_gemv_binding.o", [source, *CSRC.glob("*.h")], lambda out: [
        os.environ.get("CXX", "c++"), "-c", "-O0", *_torch_flags(), f"-I{tmp_path}", f"-I{cuda_include}",
        f"-I{CSRC}", str(source), "-o", str(out)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="running the CUDA GEMV needs a GPU")
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_gemv_matches_reference(m, dtype):
    assert hasattr(torch.ops.loralite, "nf4_gemv"), "loralite._C was built without CUDA: pip install --no-build-isolation -e ."
    torch.manual_seed(m)
    for double_quant in (True, False):
        q = nf4.quantize(torch.randn(1000, 4096, device="cuda") * 0.02, 64, double_quant)
        x = torch.randn(m, 4096, device="cuda").to(dtype)
        y = torch.ops.loralite.nf4_gemv(x, q.data, q.absmax, q.nested_absmax, q.nested_code, q.offset,
                                        q.code, 1000, 4096, 64)
        exact = (x.double() @ q.dequantize(dtype).double().T).float()
        tolerance = {torch.float32: 1e-4, torch.float16: 2**-10, torch.bfloat16: 2**-8}[dtype]
        torch.testing.assert_close(y.float(), exact, rtol=tolerance, atol=1e-3)
        assert ops._uses_gemv(x, q)
        torch.testing.assert_close(ops.nf4_matmul(x, q), y, rtol=0, atol=0)
