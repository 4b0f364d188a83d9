"""The bf16 comparison used by every kernel test: one ulp is always allowed, two are not."""

from __future__ import annotations

import pytest
import torch

from kernels.testing import Tol, assert_bf16_close, bf16_ulp

TOL = Tol(torch.bfloat16, atol=0.0, factor=2.0)


def test_bf16_ulp_is_the_spacing_of_bf16_values():
    x = torch.tensor([1.0, 1.5, 2.1729, 0.3, -3.0])
    assert torch.equal(bf16_ulp(x), torch.tensor([2**-7, 2**-7, 2**-6, 2**-9, 2**-6]))
    b = torch.tensor([1.0, 2.0, 0.25], dtype=torch.bfloat16)
    assert torch.equal((b.float() + bf16_ulp(b) / 2 * 0.99).bfloat16(), b)  # under half an ulp rounds back


def test_a_neighbouring_bf16_value_passes_even_when_torch_is_luckily_exact():
    oracle = torch.tensor([2.1729, 0.5])
    torch_bf16 = oracle.bfloat16()  # correctly rounded: torch's error is under half an ulp
    kernel = (torch_bf16.float() + bf16_ulp(oracle)).bfloat16()
    assert_bf16_close("y", kernel, torch_bf16, oracle, TOL)


def test_two_ulps_off_fails_and_names_the_output():
    oracle = torch.tensor([2.1729, 0.5])
    torch_bf16 = oracle.bfloat16()
    kernel = (torch_bf16.float() + 2.5 * bf16_ulp(oracle)).bfloat16()
    with pytest.raises(AssertionError, match="dweight: 2 bf16 elements"):
        assert_bf16_close("dweight", kernel, torch_bf16, oracle, TOL)


def test_nan_fails():
    oracle = torch.tensor([1.0, 2.0])
    with pytest.raises(AssertionError, match="NaN"):
        assert_bf16_close("y", torch.tensor([1.0, float("nan")]).bfloat16(), oracle.bfloat16(), oracle, TOL)
