"""Builds the optional ``loralite._C`` extension from ``csrc/``.

The package is pure PyTorch without it: when no compiler or no torch C++ headers are
available, the build is skipped and ``loralite.ops`` falls back to the reference path.
"""

from setuptools import setup

setup(
    packages=["loralite", "loralite.kernels"],
    package_dir={"loralite": "loralite", "loralite.kernels": "kernels"},
)
