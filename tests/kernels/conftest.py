"""Kernel tests: the Triton kernels run on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any Triton kernel is *defined*; triton reads it when ``@triton.jit``
runs, i.e. when ``kernels.triton_ops.*`` is first imported, which only these tests (or the Triton
backend) do -- so setting it here, at collection, is early enough even if torch/triton were imported
by other test folders first.

``MOEFLOW_KERNEL_TESTS_DEVICE=cuda`` (used by ``bench/gpu_check.sh``) runs the same tests compiled on
the GPU instead: no interpreter, every tensor created on CUDA by default.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("MOEFLOW_KERNEL_TESTS_DEVICE", "cpu")


def _patch_interpreter_bf16_rounding() -> None:
    """Make the interpreter round fp32 -> bf16 to nearest even, as the GPU does.

    Triton's interpreter (3.x) converts fp32 to bf16 by dropping the low mantissa bits (truncation, a
    bias toward zero that accumulates through chained bf16 kernels, e.g. the MoE MLP). The compiled
    kernels round to nearest even; so does torch. Only that one conversion is replaced.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    if getattr(original, "_moeflow_rne", False):
        return

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            src = torch.from_numpy(np.ascontiguousarray(input).view(np.float32).copy())
            return src.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    convert._moeflow_rne = True
    interpreter._convert_float = convert
    probe = np.array([1.0 + 2**-8 + 2**-10], dtype=np.float32)  # truncates to 1.0, rounds up to 1 + 2**-7
    got = interpreter._convert_float(probe, tl.float32, tl.bfloat16, None).view(np.uint16)[0]
    assert got == 0x3F81, "could not patch Triton's interpreter bf16 rounding (internals changed?)"

if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402

if DEVICE != "cpu":
    torch.set_default_device(DEVICE)
else:
    _patch_interpreter_bf16_rounding()


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
