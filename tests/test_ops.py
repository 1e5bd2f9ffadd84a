"""loralite.ops: the dispatch picks one path per device, and every path computes the reference."""

import pytest
import torch

from loralite import nf4, ops


@pytest.fixture
def q():
    torch.manual_seed(0)
    return nf4.quantize(torch.randn(48, 80) * 0.05, 64, double_quant=True)


def test_reference_mode_is_the_reference(q, monkeypatch):
    monkeypatch.setenv("LORALITE_KERNELS", "reference")
    assert ops._path(q.data) == "reference"
    assert torch.equal(ops.dequantize(q, torch.bfloat16), q.dequantize(torch.bfloat16))
    x = torch.randn(3, 7, 80)
    torch.testing.assert_close(ops.nf4_matmul(x, q), x @ q.dequantize(torch.float32).T, rtol=0, atol=0)
    g = torch.randn(3, 7, 48)
    torch.testing.assert_close(ops.nf4_matmul_t(g, q), g @ q.dequantize(torch.float32), rtol=0, atol=0)


def test_auto_mode_on_cpu_takes_the_extension_when_built(q, monkeypatch):
    monkeypatch.delenv("LORALITE_KERNELS", raising=False)
    assert ops._path(q.data) == ("cpp" if ops.HAS_EXTENSION else "reference")
    for dtype in (None, torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(ops.dequantize(q, dtype), q.dequantize(dtype))
    x = torch.randn(2, 80, dtype=torch.bfloat16)
    # Same dense weight, same torch.matmul: exactly the reference's numbers.
    assert torch.equal(ops.nf4_matmul(x, q), x @ q.dequantize(torch.bfloat16).T)
    assert not ops._uses_gemv(x, q)  # the CUDA GEMV is for CUDA tensors only


@pytest.mark.parametrize("mode", ["reference", "auto"])
def test_dequantize_into_a_buffer(q, mode, monkeypatch):
    monkeypatch.setenv("LORALITE_KERNELS", mode)
    out = torch.empty(48, 80, dtype=torch.bfloat16)
    assert ops.dequantize(q, torch.bfloat16, out=out) is out
    assert torch.equal(out, q.dequantize(torch.bfloat16))


def test_unknown_mode_names_the_variable(q, monkeypatch):
    monkeypatch.setenv("LORALITE_KERNELS", "fast")
    with pytest.raises(ValueError, match="LORALITE_KERNELS"):
        ops.dequantize(q)


def test_linear4bit_uses_the_dispatch(q, monkeypatch):
    """Linear4bit's forward and backward go through ops, on every mode available on CPU."""
    from loralite.quantize import Linear4bit

    layer = Linear4bit(q, compute_dtype=torch.float32)
    x = torch.randn(5, 80, requires_grad=True)
    outputs = []
    for mode in ("reference", "auto"):
        monkeypatch.setenv("LORALITE_KERNELS", mode)
        x.grad = None
        y = layer(x)
        y.sum().backward()
        outputs.append((y.detach(), x.grad.clone()))
    w = q.dequantize(torch.float32)
    for y, grad in outputs:
        torch.testing.assert_close(y, x.detach() @ w.T, rtol=0, atol=0)
        torch.testing.assert_close(grad, torch.ones(5, 48) @ w, rtol=0, atol=0)


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="the workspace belongs to the C++ path (loralite._C not built)")
def test_cpp_matmuls_reuse_one_workspace_per_dtype(monkeypatch):
    """The matmuls decode into a kept buffer, grown for a larger weight, and still give the reference."""
    monkeypatch.delenv("LORALITE_KERNELS", raising=False)
    ops.release_workspaces()  # whatever earlier tests left (a larger weight's buffer)
    torch.manual_seed(1)
    small, large = (nf4.quantize(torch.randn(n, 64), 64) for n in (32, 96))
    x, g = torch.randn(4, 64), torch.randn(4, 96)
    results = [(ops.nf4_matmul(x, w), w) for w in (small, large, small)]
    buffer = ops._workspaces.buffers[torch.float32]
    assert buffer.numel() == 96 * 64
    assert torch.equal(ops.nf4_matmul_t(g, large), g @ large.dequantize(torch.float32))
    assert ops._workspaces.buffers[torch.float32] is buffer  # reused, not reallocated
    for y, w in results:  # a later call never changes an earlier result
        assert torch.equal(y, x @ w.dequantize(torch.float32).T)


@pytest.mark.skipif(ops._CPU_GEMV is None, reason="loralite._C was not built with the CPU GEMV")
def test_linear_takes_the_gemv_only_for_decoding_without_autograd(monkeypatch):
    monkeypatch.delenv("LORALITE_KERNELS", raising=False)
    calls = []
    real = ops._CPU_GEMV
    monkeypatch.setattr(ops, "_CPU_GEMV", lambda *args: calls.append(args) or real(*args))
    w, b = torch.randn(24, 40), torch.randn(24)
    x = torch.randn(1, 3, 40)  # 3 rows: a decode step of a batch of 3
    with torch.no_grad():
        y = ops.linear(x, w, b)
    assert len(calls) == 1 and y.shape == (1, 3, 24)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    ops.linear(torch.randn(5, 40), w, b)  # 5 rows: a prompt, F.linear
    ops.linear(x.requires_grad_(), w, b).sum().backward()  # autograd needs F.linear
    ops.linear(x.detach().double(), w.double())  # float64: F.linear
    monkeypatch.setenv("LORALITE_KERNELS", "reference")
    ops.linear(x.detach(), w, b)
    assert len(calls) == 1 and x.grad is not None


def _recording(monkeypatch, name: str) -> list:
    """Replaces ops.<name> (a loralite._C operator) by a wrapper that records its calls."""
    calls, real = [], getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *args: calls.append(args) or real(*args))
    return calls


@pytest.mark.skipif(ops._CPU_DECODE_ATTENTION is None, reason="loralite._C was not built with the decode operators")
def test_decode_ops_run_only_for_inference_and_compute_the_reference(monkeypatch):
    """rms_norm and one-query attention take loralite._C without autograd on CPU, else the
    reference (rotary takes it either way, with its own backward); both paths agree."""
    monkeypatch.delenv("LORALITE_KERNELS", raising=False)
    calls = {name: _recording(monkeypatch, name) for name in ("_CPU_RMS_NORM", "_CPU_ROTARY", "_CPU_DECODE_ATTENTION")}
    torch.manual_seed(0)
    x, w = torch.randn(2, 1, 4, 8), torch.randn(8)
    angles = torch.rand(2, 1, 8)
    q, kv = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8)  # (B, H, T, hd), (B, Hkv, S, hd)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None]  # (B, 1, 1, S)

    def run():
        return (ops.rms_norm(x, w, 1e-6), ops.rotary(x, angles.cos(), angles.sin()),
                ops.attention(q, kv, kv, mask), ops.attention(q, kv, kv))

    with torch.no_grad():
        fast = run()
    assert [len(c) for c in calls.values()] == [1, 1, 2]
    for t in (x, q):
        t.requires_grad_()
    slow = run()  # autograd: the reference ops, and rotary's autograd Function
    assert [len(c) for c in calls.values()] == [1, 2, 2]
    assert fast[2].shape == fast[3].shape == (2, 4, 1, 8)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ops.attention(torch.randn(2, 4, 3, 8), kv, kv, mask)  # 3 queries (a prompt): SDPA
    assert len(calls["_CPU_DECODE_ATTENTION"]) == 2


@pytest.mark.skipif(ops._CPU_ROTARY is None, reason="loralite._C was not built with the rotary operator")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_gradient_through_the_operator_equals_the_reference(monkeypatch, dtype):
    """With autograd, ops.rotary runs loralite._C forward and backward; values and x's gradient
    equal autograd through the reference ops (bit for bit in float32)."""
    monkeypatch.delenv("LORALITE_KERNELS", raising=False)
    calls = _recording(monkeypatch, "_CPU_ROTARY")
    torch.manual_seed(0)
    angles = torch.rand(2, 5, 8) * 10
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, hd): a RoPE table repeats its halves
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    x = torch.randn(2, 5, 3, 16).to(dtype).requires_grad_()
    dy = torch.randn(2, 5, 3, 16).to(dtype)
    y = ops.rotary(x, cos, sin)
    (grad,) = torch.autograd.grad(y, x, dy)
    assert len(calls) == 2  # forward and backward
    monkeypatch.setenv("LORALITE_KERNELS", "reference")
    y_ref = ops.rotary(x, cos, sin)
    (grad_ref,) = torch.autograd.grad(y_ref, x, dy)
    assert torch.equal(y, y_ref)
    if dtype == torch.float32:
        assert torch.equal(grad, grad_ref)
    else:  # the reference rounds dy * sin before rotating it, the operator rotates dy first
        torch.testing.assert_close(grad, grad_ref, rtol=2**-7, atol=2**-7)


@pytest.mark.skipif(ops._CPU_GEMV_GROUP is None, reason="loralite._C was not built with gemv_group")
def test_llama_project_groups_plain_linears_only_while_decoding(monkeypatch):
    """llama.project: one gemv_group call for plain Linears without autograd; module calls (and so
    their hooks, LoRA and autograd) otherwise; the same numbers either way."""
    from loralite.llama import Linear, project

    monkeypatch.delenv("LORALITE_KERNELS", raising=False)
    calls = _recording(monkeypatch, "_CPU_GEMV_GROUP")
    torch.manual_seed(0)
    linears = [Linear(32, n, bias=n == 8) for n in (16, 8, 8)]
    x = torch.randn(1, 1, 32)
    expected = [m(x).detach() for m in linears]  # autograd on: module calls
    assert calls == []
    with torch.no_grad():
        grouped = project(x, *linears)
        assert len(calls) == 1
        seen = []
        linears[1].register_forward_hook(lambda *args: seen.append(1))
        hooked = project(x, *linears)  # a hook must run: module calls
    assert len(calls) == 1 and seen == [1]
    for a, b, c in zip(grouped, hooked, expected):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("major, limit", [(8, 128), (9, 256), (10, 256), (7, 128)])
def test_cuda_dispatch_by_size(monkeypatch, major, limit):
    """The fused kernels up to FUSED_MAX_ROWS rows for weights of whole-block rows; beyond, cuBLAS."""
    monkeypatch.delenv("LORALITE_KERNELS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    whole, spanning = nf4.quantize(torch.randn(32, 128)), nf4.quantize(torch.randn(32, 96))
    assert ops.fused_max_rows(torch.device("cuda")) == limit
    for rows, expected in ((1, True), (limit, True), (limit + 1, False)):
        assert ops._takes_fused(torch.empty(rows, 128), whole) == expected
    assert not ops._takes_fused(torch.empty(4, 96), spanning)
    monkeypatch.setenv("LORALITE_KERNELS", "triton")  # forced: the kernels for every size (their tests)
    assert ops._takes_fused(torch.empty(10 * limit, 128), whole)
