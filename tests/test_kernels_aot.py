"""The Triton kernels compiled ahead of time for sm_80/86/89/90, as the real dispatch launches them.

No GPU is needed: every config either autotuner may pick is compiled for each arch (see
``loralite.kernels.aot``) and must fit the chip's shared memory, spill nothing, use tensor
cores in the matmuls' main loop, and read the packed weights with 16-byte vector loads. The
compiles (~200, a few seconds each) run once, in fresh processes over the CPU's cores (this
suite's own process runs the kernels in Triton's interpreter).
"""

import pytest
import torch

from loralite.kernels import aot

pytestmark = pytest.mark.slow

# The launches Linear4bit makes: bf16 compute, blocksize 64, with and without double quantization.
MATMULS = [(("bfloat16", 64, double_quant, transpose), i, launch.name)
           for double_quant in (True, False) for transpose in (False, True)
           for i, launch in enumerate(aot.matmul_launches(torch.bfloat16, 64, double_quant, transpose))]
DEQUANTIZES = [("bfloat16", 64, True), ("bfloat16", 64, False), ("float16", 128, True)]


@pytest.fixture(scope="module")
def statics() -> dict:
    jobs = [(arch, "matmul", args, i) for arch in aot.ARCHS for args, i, _ in MATMULS]
    jobs += [(arch, "dequantize", args, 0) for arch in aot.ARCHS for args in DEQUANTIZES]
    return dict(zip(jobs, aot.compile_all(jobs)))


def _resource_problems(name: str, s: aot.Static) -> list[str]:
    problems = [f"{name}: {s.shared} bytes of shared memory > {aot.SHARED_LIMIT[s.arch]}"] if not s.fits else []
    if s.spill_bytes:
        problems.append(f"{name}: spills {s.spill_bytes} bytes per thread")
    if not s.loads.get("LDG.E.128", 0) + s.loads.get("LDGSTS.E.BYPASS.128", 0):
        problems.append(f"{name}: no 16-byte global load of the packed codes ({s.loads})")
    return problems


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_every_matmul_config_launches_on_every_arch(statics, arch):
    problems = []
    for args, i, name in MATMULS:
        s = statics[(arch, "matmul", args, i)]
        problems += _resource_problems(name, s)
        if not s.loop_mma:
            problems.append(f"{name}: no tensor-core instruction in the main loop")
    assert not problems, f"sm_{arch}:\n" + "\n".join(problems)


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_dequantize_kernel_launches_on_every_arch(statics, arch):
    problems = []
    for args in DEQUANTIZES:
        problems += _resource_problems(f"nf4_dequantize{args}", statics[(arch, "dequantize", args, 0)])
    assert not problems, f"sm_{arch}:\n" + "\n".join(problems)


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_no_byte_loads_of_the_codes_in_the_main_loop(statics, arch):
    """In the main loop the packed codes arrive 16 bytes at a time (cp.async or LDG.E.128); the one
    single-byte load left, with double quantization only, is the 8-bit scale code of the thread's
    row segment (one per 64 weights), and the code values are never fetched from global memory."""
    for args, i, name in MATMULS:
        double_quant = args[2]
        loads = statics[(arch, "matmul", args, i)].loop_loads
        assert loads.get("LDG.E.U8", 0) <= (1 if double_quant else 0), f"{name}: {loads}"
        assert loads.get("LDGSTS.E.BYPASS.128", 0) + loads.get("LDG.E.128", 0) > 0, f"{name}: {loads}"
        # nothing between: no 2- or 8-byte loads (codes split into narrow pieces), only 4-byte
        # gathers of the per-block nested scales beside the 16-byte vectors
        narrow = {op: n for op, n in loads.items() if op.endswith((".64", ".U16", ".S16", ".S8"))}
        assert not narrow, f"{name}: {narrow}"
