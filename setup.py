"""Builds the optional ``loralite._C`` extension from ``csrc/``.

The package is pure PyTorch without it: when torch is not importable at build time (pip's
build isolation), when there is no compiler, or when the build fails, setup warns and installs
without the extension, and ``loralite.ops`` falls back to the reference path. Every build attempt
writes what happened, the compiler's output included, to ``build/loralite_C.log`` (the test
suite fails, naming that file, when a compiler and torch's headers are present but the
extension is missing). Build it with

    pip install --no-build-isolation -e .

``loralite._C`` holds the CPU operators ``nf4_quantize``, ``nf4_dequantize``, ``dropout`` and, for decoding, ``gemv``,
``rms_norm``, ``rotary`` and ``decode_attention``; when torch has CUDA and nvcc is on the PATH,
also the CUDA NF4 GEMV ``nf4_gemv``. ``LORALITE_BUILD_EXTENSION=0`` skips the build.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

# Flags shared by every build: no fused multiply-add, so that the CPU operator rounds exactly
# as the PyTorch reference does (its output must be bit-identical).
CXX_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off"]
# at::parallel_for is inline OpenMP in torch's headers: without -fopenmp the operators would run on
# one thread. At run time the linked libgomp.so.1 is the one torch has already loaded.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
NVCC_FLAGS = ["-O3", "--fmad=false"]
BUILD_LOG = Path(__file__).resolve().parent / "build" / "loralite_C.log"


def _log(text: str, mode: str = "a") -> None:
    BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(BUILD_LOG, mode) as f:
        f.write(text.rstrip("\n") + "\n")


def _warn_skip(reason: str) -> None:
    _log(f"loralite._C: not built: {reason}")
    warnings.warn(f"loralite._C is not built ({reason}); loralite stays pure PyTorch. Details in {BUILD_LOG}. "
                  "To build it: pip install --no-build-isolation -e .", stacklevel=2)


@contextlib.contextmanager
def _output_to_log():
    """Sends this process's stdout and stderr, and so the compiler's and ninja's, to BUILD_LOG."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(BUILD_LOG, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _extension_build():
    """(ext_modules, cmdclass) for loralite._C, or ([], {}) when it cannot be built here."""
    _log(f"loralite._C build, python {sys.version.split()[0]}", mode="w")
    if os.environ.get("LORALITE_BUILD_EXTENSION", "1") == "0":
        _log("loralite._C: skipped: LORALITE_BUILD_EXTENSION=0")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn_skip("torch is not importable at build time")
        return [], {}
    sources = ["csrc/module.cpp", "csrc/nf4_cpu.cpp", "csrc/nf4_quantize_cpu.cpp", "csrc/gemv_cpu.cpp",
               "csrc/dropout_cpu.cpp", "csrc/decode_cpu.cpp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None \
        and shutil.which("nvcc") is not None
    if with_cuda:
        sources += ["csrc/nf4_gemv.cu", "csrc/nf4_gemv_binding.cpp"]
        extension = cpp_extension.CUDAExtension(
            "loralite._C", sources, extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=OPENMP_FLAGS, optional=True)
    else:
        extension = cpp_extension.CppExtension(
            "loralite._C", sources, extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS},
            extra_link_args=OPENMP_FLAGS, optional=True)
    return [extension], {"build_ext": _optional(cpp_extension.BuildExtension)}


def _optional(build_ext_class):
    """``build_ext_class`` that warns and skips an extension whose build fails.

    setuptools' ``optional=True`` skips only distutils' compiler errors (and, for editable
    installs, the copy of the missing library); torch's ninja build raises others.
    """
    from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError

    class OptionalBuildExtension(build_ext_class):
        def build_extension(self, ext):
            try:
                with _output_to_log():
                    super().build_extension(ext)
            except (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError,
                    RuntimeError, subprocess.CalledProcessError) as error:
                _log(traceback.format_exc())
                _warn_skip(f"the build failed: {error}")
            else:
                _log("loralite._C: built")

    return OptionalBuildExtension


ext_modules, cmdclass = _extension_build()

setup(
    packages=["loralite", "loralite.kernels"],
    ext_modules=ext_modules,
    cmdclass=cmdclass or {"build_ext": build_ext},
)
