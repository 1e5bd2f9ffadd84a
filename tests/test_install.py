"""What an install must give: the C++ extension where it can be built, pinned references, no shadowed imports."""

import importlib.metadata
import importlib.util
import os
import pathlib
import re
import shutil
import sys
import tomllib

import torch
from torch.utils import cpp_extension

from loralite import ops

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_LOG = ROOT / "build" / "loralite_C.log"  # written by setup.py at every build
# Optional imports of the reference libraries that no installed package provides here:
# bitsandbytes (CPU, AVX512-BF16) and transformers try ``from kernels import get_kernel``, the
# Hugging Face kernel hub; a folder or module of that name would be imported in its place.
OPTIONAL_IMPORTS = {"kernels"}


def test_extension_is_built_where_it_can_be():
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    headers = pathlib.Path(cpp_extension.include_paths()[0], "torch", "extension.h").is_file()
    if os.environ.get("LORALITE_BUILD_EXTENSION") == "0" or not (compiler and headers):
        return  # the pure-PyTorch install is a valid one where the extension cannot or must not be built
    log = BUILD_LOG.read_text()[-3000:] if BUILD_LOG.is_file() else "(no build log)"
    assert ops.HAS_EXTENSION, (
        f"loralite._C is missing although {compiler} and torch's headers are here: the build failed or was "
        f"skipped. See {BUILD_LOG}, then rebuild with: pip install --no-build-isolation -e .\n{log}")
    for name in ("nf4_dequantize", "nf4_quantize", "gemv", "gemv_group", "rms_norm", "rotary", "decode_attention",
                 "dropout", "dropout_backward"):
        assert hasattr(torch.ops.loralite, name), name


def _test_extra() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]["test"]


def test_test_extra_is_pinned_and_installed():
    for requirement in _test_extra():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+-]*)", requirement)
        assert match, f"pyproject.toml: test extra {requirement!r} is not pinned as NAME==VERSION"
        name, version = match.groups()
        assert importlib.metadata.version(name) == version, (
            f"{name} {importlib.metadata.version(name)} is installed, the suite was validated with {version}: "
            "pip install -e '.[test]'")


def _local_names(folder: pathlib.Path) -> set[str]:
    """Top-level import names that ``folder`` provides when it is on sys.path."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    return names


def _installed_names() -> set[str]:
    """Top-level import names of every installed distribution, of the standard library and optional imports."""
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    return installed | OPTIONAL_IMPORTS


def test_no_repository_name_shadows_an_installed_module():
    """``python X.py`` from the root or from benchmarks/ puts that folder first on sys.path."""
    installed = _installed_names()
    root = _local_names(ROOT) - {"setup"}  # setup.py is only run, never imported
    assert root == {"loralite"}, f"the repository root must hold no importable name but loralite: {sorted(root)}"
    clashes = _local_names(ROOT / "benchmarks") & installed
    assert not clashes, f"benchmarks/ shadows installed or optionally imported modules: {sorted(clashes)}"
    clashes = _local_names(ROOT / "tests") & installed
    assert not clashes, f"tests/ shadows installed or optionally imported modules: {sorted(clashes)}"


def test_kernels_load_as_part_of_loralite():
    spec = importlib.util.find_spec("loralite.kernels")
    assert spec is not None and pathlib.Path(spec.origin).parent == ROOT / "loralite" / "kernels"


def test_loralite_imports_with_only_torch_triton_transformers_and_peft():
    """The GPU suite's machines may lack the gguf package: loralite imports it only to read a GGUF file."""
    import subprocess

    code = ("import sys; sys.modules['gguf'] = None\n"  # an import of gguf now fails
            "import loralite, loralite.ops, loralite.train, loralite.memory\n"
            "print(loralite.estimate_memory(loralite.configs.load_config('llama-2-7b')).total > 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
