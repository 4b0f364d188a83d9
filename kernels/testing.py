"""Comparison helpers for the kernel tests (and the GPU check): stated tolerances, Liger-style bf16 bounds.

fp32: ``|out - ref| <= atol + rtol |ref|`` elementwise (``torch.testing.assert_close``).
bf16: the kernel's error against an fp32 oracle (the reference run on the same inputs upcast to fp32)
must stay within ``factor`` times plain torch's (max) bf16 error against that oracle (Liger-Kernel
``test_rms_norm.py``: a kernel may round differently from torch, but not worse), plus ``atol`` and
``rtol |oracle|`` elementwise. The first term is never below one bf16 ulp at the oracle's magnitude: on a
handful of elements torch's max error can be far under an ulp by luck, and a reduction accumulated in
another order legitimately lands on the neighbouring bf16 value (seen: rms_norm dweight, 3 rows, 1 ulp).
(Triton's interpreter truncates fp32 -> bf16 where the GPU rounds to nearest
even; ``tests/kernels/conftest.py`` patches the interpreter to round like the GPU, so no slack is needed
for that; ``rtol = 2**-7``, one bf16 ulp, would be the allowance without the patch.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    """Tolerance of one (op, dtype): fp32 uses atol/rtol; bf16 uses factor/atol (see module doc)."""

    dtype: torch.dtype
    atol: float
    rtol: float = 0.0
    factor: float = 0.0


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: Tol) -> None:
    """Elementwise closeness (fp32 tolerances); NaN anywhere (a poisoned element never written) fails."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output (an element the kernel never wrote?)"
    torch.testing.assert_close(out.float(), ref.float(), atol=tol.atol, rtol=tol.rtol, msg=lambda m: f"{name}: {m}")


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values (8 significant bits) at the magnitude of each element of ``x``."""
    exponent = torch.floor(torch.log2(x.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)))
    return torch.exp2(exponent - 7)


def assert_bf16_close(name: str, out: torch.Tensor, ref_bf16: torch.Tensor, ref_fp32: torch.Tensor, tol: Tol) -> None:
    """``|out - oracle| <= max(factor max|ref_bf16 - oracle|, ulp(oracle)) + atol + rtol |oracle|`` elementwise.

    Also fails on any NaN.
    """
    assert out.shape == ref_fp32.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_fp32.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output (an element the kernel never wrote?)"
    oracle = ref_fp32.float()
    err = (out.float() - oracle).abs()
    torch_err = (ref_bf16.float() - oracle).abs().max().item()
    bound = torch.clamp(bf16_ulp(oracle), min=tol.factor * torch_err) + tol.atol + tol.rtol * oracle.abs()
    bad = err > bound
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} bf16 elements off the fp32 oracle by more than max({tol.factor} x torch's bf16 "
        f"error {torch_err:.3g}, 1 ulp) + {tol.atol:g} + {tol.rtol:g}|oracle|; worst error {err.max().item():.3g}"
    )


def check_outputs(
    names: list[str],
    got: list[torch.Tensor],
    want: list[torch.Tensor],
    tol: Tol,
    oracle: list[torch.Tensor] | None = None,
) -> None:
    """Compare every named output/gradient: fp32 elementwise, bf16 against the fp32 ``oracle`` list."""
    assert len(names) == len(got) == len(want), f"{len(names)} names, {len(got)} results, {len(want)} references"
    if tol.dtype == torch.float32:
        for name, a, b in zip(names, got, want, strict=True):
            assert_close(name, a, b, tol)
        return
    assert oracle is not None and len(oracle) == len(names), "bf16 needs an fp32 oracle for every output"
    for name, a, b, c in zip(names, got, want, oracle, strict=True):
        assert_bf16_close(name, a, b, c, tol)
