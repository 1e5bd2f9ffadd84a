"""Compile the Triton kernels ahead of time for a GPU that is not here, and read what they need.

A kernel that passes its tests under ``TRITON_INTERPRET=1`` may still be unable to launch: a
config can need more shared memory per block than the chip has, or spill registers. Triton
compiles for any target without a device (``triton.compile(ASTSource(...), target=GPUTarget(...))``),
and its wheel ships ``cuobjdump``; from the cubin this module reads

- ``shared``: bytes of shared memory per block, the figure Triton's launcher checks;
- ``registers`` and ``spill_bytes`` (local memory per thread, 0 when nothing spills);
- the SASS of the kernel: tensor-core instructions (``HMMA`` on sm_80-89, ``HGMMA`` on sm_90),
  global loads by width, and the instruction mix of the main loop (the innermost backward branch).

The launch signatures are built the way Triton's JIT specializes a real call: pointers and
integers divisible by 16 are marked so (``tt.divisibility``), as Llama's shapes and torch's
allocations are. Used by ``tests/test_kernels_aot.py`` and ``benchmarks/kernel_static.py``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import importlib
import multiprocessing
import os
import pathlib
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Shared memory a block may use (the opt-in maximum, bytes), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ARCHS = tuple(SHARED_LIMIT)
_BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "uint8": "u8"}


@dataclasses.dataclass(frozen=True)
class Static:
    """What one compiled kernel needs and holds (see the module docstring)."""

    arch: int
    shared: int  # bytes per block
    registers: int  # per thread
    spill_bytes: int  # local memory per thread
    mma: int  # tensor-core instructions in the whole kernel
    loop_instructions: int  # instructions of the main loop's body
    loop_integer: int  # integer, logic and select instructions among them
    loop_mma: int  # tensor-core instructions among them
    loads: dict  # global load opcode -> count, whole kernel (LDG.E.128 = 16-byte vector loads)
    loop_loads: dict  # the same, in the main loop

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_LIMIT[self.arch]


@dataclasses.dataclass(frozen=True)
class Launch:
    """One way the dispatch launches a kernel: its signature, constexprs and config."""

    name: str
    fn: object  # the triton.jit function
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple[str, ...]

    def compile(self, arch: int):
        return compile_kernel(self.fn, self.signature, self.constexprs, arch, self.num_warps, self.num_stages,
                              self.divisible, enable_fp_fusion=False)


def matmul_launches(dtype, blocksize: int, double_quant: bool, transpose: bool) -> list[Launch]:
    """Every launch of ``nf4_matmul`` (``transpose=True``: ``nf4_matmul_t``) for inputs of ``dtype``:
    one per config of the large-M and the small-M (split-K) autotuners, as ``_matmul`` calls them."""
    mm = importlib.import_module("loralite.kernels.nf4_matmul")  # the module: the package exports its function

    a = str(dtype).removeprefix("torch.")
    launches = []
    for family, configs in (("large", mm.LARGE_CONFIGS), ("small", mm.SMALL_CONFIGS)):
        out = "float32" if family == "small" else a  # split-K adds into a float32 output
        signature = {"a_ptr": pointer(a), "out_ptr": pointer(out), "data_ptr": "*u8",
                     "absmax_ptr": "*u8" if double_quant else "*fp32", "nested_absmax_ptr": "*fp32",
                     "nested_code_ptr": "*fp32", "code_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                     "row_bytes": "i32", "M_BUCKET": "i32", "stride_am": "i32", "stride_om": "i32", "offset": "fp32"}
        constants = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, TRANSPOSE=transpose,
                         INPUT_PRECISION="ieee" if a == "float32" else "tf32", INTERPRET=False)
        for config in configs:
            meta = {**constants, **config.kwargs}
            name = (f"{'nf4_matmul_t' if transpose else 'nf4_matmul'}-{a}-bs{blocksize}-dq{int(double_quant)}-"
                    f"{family}-{meta['BLOCK_M']}x{meta['BLOCK_P']}x{meta['BLOCK_R']}-split{meta['SPLIT_K']}-"
                    f"w{config.num_warps}s{config.num_stages}")
            launches.append(Launch(name, mm._nf4_matmul_kernel, {**signature, **{k: "constexpr" for k in meta}},
                                   meta, config.num_warps, config.num_stages,
                                   divisible=tuple(k for k in signature if k.endswith("_ptr"))
                                   + ("N", "K", "row_bytes", "stride_am", "stride_om")))
    return launches


def dequantize_launch(dtype, blocksize: int, double_quant: bool) -> Launch:
    """The launch of ``nf4_dequantize`` to ``dtype``, as ``kernels.nf4.nf4_dequantize`` makes it."""
    nf4 = importlib.import_module("loralite.kernels.nf4")
    out = str(dtype).removeprefix("torch.")
    signature = {"out_ptr": pointer(out), "data_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32",
                 "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "code_ptr": "*fp32", "numel": "i32",
                 "nbytes": "i32", "offset": "fp32"}
    block = max(nf4.DEQUANTIZE_BLOCK, blocksize)
    meta = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, BLOCK=block, SCALES=block // blocksize,
                INTERPRET=False)
    return Launch(f"nf4_dequantize-{out}-bs{blocksize}-dq{int(double_quant)}", nf4._nf4_dequantize_kernel,
                  {**signature, **{k: "constexpr" for k in meta}}, meta, nf4.DEQUANTIZE_WARPS, 1,
                  divisible=tuple(k for k in signature if k.endswith("_ptr")) + ("numel", "nbytes"))


# A job names a launch by how to rebuild it, since Triton kernels do not pickle:
# (arch, "matmul", (dtype name, blocksize, double_quant, transpose), index) or (arch, "dequantize", args, 0).
def _run_job(job) -> Static:
    import torch

    arch, kind, (dtype, *rest), index = job
    dtype = getattr(torch, dtype)
    launch = matmul_launches(dtype, *rest)[index] if kind == "matmul" else dequantize_launch(dtype, *rest)
    return inspect(launch.compile(arch), arch)


def compile_all(jobs: list) -> list[Static]:
    """``inspect`` of every job's launch, compiled in fresh processes over the CPU's cores.

    The workers start with ``TRITON_INTERPRET=0``, so that they compile the real kernels rather than
    the interpreter's stand-ins (the tests run this process under ``TRITON_INTERPRET=1``).
    """
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # inherited by the spawned workers
    try:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
            return list(pool.map(_run_job, jobs))
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def pointer(dtype: str) -> str:
    """A Triton signature entry for a pointer to ``dtype`` (a torch dtype name)."""
    return "*" + _TYPES[dtype]


def compile_kernel(fn, signature: dict[str, str], constexprs: dict, arch: int, num_warps: int, num_stages: int,
                   divisible: tuple[str, ...] = (), enable_fp_fusion: bool = True):
    """``fn`` (a ``triton.jit`` function, not its autotuner) compiled for ``sm_<arch>``.

    Args:
        signature: argument name -> Triton type ("*bf16", "i32", "fp32", or "constexpr").
        constexprs: values of the constexpr arguments.
        divisible: arguments that the JIT would mark as divisible by 16.
    """
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   "enable_fp_fusion": enable_fp_fusion})


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(_BIN / "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


# Integer, logic and select instructions: most of the decode's work beside its shared-memory reads.
_INTEGER = re.compile(r"^(I|LOP|SHF|SEL|FSEL|PRMT|LEA|ISETP|BMSK|BFE|BFI|POPC|FLO|VIADD|IMAD|IADD|SGXT|ICMP|IABS|IMNMX)")


def _body(line: str) -> str | None:
    """The opcode of a SASS instruction line, or None for other lines."""
    match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
    return match.group(1) if match else None


def _main_loop(sass: str) -> list[str]:
    """Opcodes of the kernel's main loop: the longest span from a branch target to a later branch
    back to it (``BRA 0x20d0`` at 0x8b40); empty when the kernel has no loop."""
    entries = []  # (address, opcode, line)
    for line in sass.splitlines():
        op = _body(line)
        if op is not None:
            entries.append((int(re.match(r"\s*/\*([0-9a-f]+)\*/", line).group(1), 16), op, line))
    best: list[str] = []
    for address, op, line in entries:
        target = re.search(r"\bBRA\s+0x([0-9a-f]+)", line) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [o for a, o, _ in entries if start <= a <= address]
            best = max(best, body, key=len)
    return best


def _global_loads(opcodes: list[str]) -> dict[str, int]:
    """Count of each global load opcode (LDG..., and LDGSTS... for cp.async) among ``opcodes``."""
    return dict(collections.Counter(op for op in opcodes if op.startswith("LDG")))


def inspect(compiled, arch: int) -> Static:
    """The resource and instruction figures of a compiled kernel."""
    cubin = compiled.asm["cubin"]
    usage = _cuobjdump("-res-usage", cubin)
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = int(re.search(r"LOCAL:(\d+)", usage).group(1)) + int(re.search(r"STACK:(\d+)", usage).group(1))
    sass = _cuobjdump("-sass", cubin)
    opcodes = [op for op in map(_body, sass.splitlines()) if op]
    is_mma = lambda op: op.startswith(("HMMA", "HGMMA", "WGMMA"))  # noqa: E731
    loop = _main_loop(sass)
    return Static(arch=arch, shared=compiled.metadata.shared, registers=registers, spill_bytes=spills,
                  mma=sum(map(is_mma, opcodes)), loop_instructions=len(loop),
                  loop_integer=sum(bool(_INTEGER.match(op)) for op in loop), loop_mma=sum(map(is_mma, loop)),
                  loads=_global_loads(opcodes), loop_loads=_global_loads(loop))
