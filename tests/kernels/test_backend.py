"""Backend selection: auto picks torch on CPU, names are validated, a named backend that cannot run fails."""

from __future__ import annotations

import logging

import pytest
import torch

import kernels
from kernels import backend


@pytest.fixture(autouse=True)
def _reset():
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def test_auto_uses_the_torch_reference_on_cpu_and_logs_why_once(monkeypatch, caplog):
    monkeypatch.setenv("MOEFLOW_KERNEL_BACKEND", "auto")
    kernels.set_backend(None)
    with caplog.at_level(logging.INFO, logger="kernels.backend"):
        assert backend.resolve(torch.device("cpu")) == "torch"
        assert backend.resolve(torch.device("cpu")) == "torch"
    msgs = [r.getMessage() for r in caplog.records if "moeflow kernels" in r.getMessage()]
    assert len(msgs) == 1 and "torch backend on cpu" in msgs[0] and "need CUDA" in msgs[0]


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv("MOEFLOW_KERNEL_BACKEND", "torch")
    kernels.set_backend(None)
    assert kernels.get_backend() == "torch"
    monkeypatch.setenv("MOEFLOW_KERNEL_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="MOEFLOW_KERNEL_BACKEND"):
        kernels.get_backend()


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="auto, triton, torch"):
        kernels.set_backend("cutlass")


def test_triton_by_name_on_cpu_without_the_interpreter_fails_loudly(monkeypatch):
    kernels.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(kernels.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        kernels.swiglu(torch.randn(3, device="cpu"), torch.randn(3, device="cpu"))


def test_triton_by_name_without_triton_installed_fails_loudly(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton":
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(backend.importlib, "import_module", lambda n: no_triton(n))
    with pytest.raises(kernels.BackendUnavailableError, match="triton does not import"):
        kernels.set_backend("triton")


def test_forced_torch_backend_never_imports_the_triton_ops(monkeypatch):
    kernels.set_backend("torch")
    monkeypatch.setattr(backend, "triton_op", lambda name: pytest.fail(f"imported triton op {name}"))
    kernels.rms_norm(torch.randn(2, 8, device="cpu"), torch.ones(8, device="cpu"), 1e-6)


def test_host_wrappers_reject_bad_inputs_with_a_message():
    with pytest.raises(AssertionError, match="weight must be"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(AssertionError, match="targets must be int64"):
        kernels.fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(AssertionError, match="cos must be"):
        kernels.apply_rope(torch.randn(1, 4, 8), torch.randn(4, 3), torch.randn(4, 4))
    with pytest.raises(AssertionError, match="w_down must be"):
        kernels.moe_ffn(torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2),
                        torch.randn(4, 5, 8), torch.randn(4, 5, 8), torch.randn(4, 5, 8))


def test_triton_host_wrappers_reject_non_contiguous_inputs(triton_backend):
    from kernels.triton_ops.swiglu import swiglu_fwd

    g = torch.randn(8, 6).T
    with pytest.raises(AssertionError, match="must be contiguous"):
        swiglu_fwd(g, g)
