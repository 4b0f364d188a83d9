"""Kernel tests: the Triton kernels run on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any Triton kernel is *defined*; triton reads it when ``@triton.jit``
runs, i.e. when ``kernels.triton_ops.*`` is first imported, which only these tests (or the Triton
backend) do -- so setting it here, at collection, is early enough even if torch/triton were imported
by other test folders first.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402


@pytest.fixture
def seed(request) -> int:
    """A fresh random seed per test (inputs differ every run), printed on failure to reproduce it."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    print(f"torch seed {s}")
    return s


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (interpreted on CPU) for one test."""
    kernels.set_backend("triton")
    yield
    kernels.set_backend(None)


@pytest.fixture
def torch_backend():
    kernels.set_backend("torch")
    yield
    kernels.set_backend(None)


def run_both(fn):
    """Run ``fn()`` with the Triton backend and then with the torch reference; return both results."""
    try:
        kernels.set_backend("triton")
        out_triton = fn()
        kernels.set_backend("torch")
        out_torch = fn()
    finally:
        kernels.set_backend(None)
    return out_triton, out_torch


@pytest.fixture
def both():
    return run_both
