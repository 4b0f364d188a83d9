"""Distillation-loss row kernel (forward KL, reverse KL, generalised JSD) for the fused linear loss.

Same engine contract as ``cross_entropy``: the host computes one chunk of student and teacher logits,
this kernel returns per-token losses and overwrites the student chunk with d loss / d z_s. Per row, with
``ls = log_softmax(zs / T)``, ``lt = log_softmax(zt / T)``, ``s = exp(ls)``, ``t = exp(lt)``:
- forward KL  ``sum t (lt - ls)``,                 grad ``(s - t) / T``
- reverse KL  ``sum s a``, ``a = ls - lt``,        grad ``s (a - <s, a>) / T``
- JSD(beta)   ``lm = log((1-beta) s + beta t)``, ``beta sum t (lt - lm) + (1-beta) sum s (ls - lm)``,
              grad ``s (b - <s, b>) / T`` with ``b = (1 - beta)(ls - lm)``
Three passes over V: the two log-partition functions; the loss and ``<s, g>``; the gradient.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference.distill import resolve_kind
from ._common import check_contiguous, next_pow2

_KIND = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _distill_rows_kernel(ZS, ZT, LOSS, V, inv_temp, beta, log_beta, log_1m_beta,
                         KIND: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    zs_row = ZS + row.to(tl.int64) * V
    zt_row = ZT + row.to(tl.int64) * V
    cols = tl.arange(0, BLOCK_V)
    ms = tl.full((), float("-inf"), tl.float32)
    mt = tl.full((), float("-inf"), tl.float32)
    ds = tl.zeros((), tl.float32)
    dt = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        a = tl.load(zs_row + start + cols, mask=mask, other=float("-inf")) * inv_temp
        b = tl.load(zt_row + start + cols, mask=mask, other=float("-inf")) * inv_temp
        ms_new = tl.maximum(ms, tl.max(a, axis=0))
        mt_new = tl.maximum(mt, tl.max(b, axis=0))
        ds = ds * tl.exp(ms - ms_new) + tl.sum(tl.exp(a - ms_new), axis=0)
        dt = dt * tl.exp(mt - mt_new) + tl.sum(tl.exp(b - mt_new), axis=0)
        ms = ms_new
        mt = mt_new
    lse_s = ms + tl.log(ds)
    lse_t = mt + tl.log(dt)
    loss = tl.zeros((), tl.float32)
    sg = tl.zeros((), tl.float32)  # <s, g>
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        ls = tl.load(zs_row + start + cols, mask=mask, other=0.0) * inv_temp - lse_s
        lt = tl.load(zt_row + start + cols, mask=mask, other=0.0) * inv_temp - lse_t
        s = tl.exp(ls)
        t = tl.exp(lt)
        if KIND == 0:
            term = t * (lt - ls)
        elif KIND == 1:
            term = s * (ls - lt)
            sg += tl.sum(tl.where(mask, term, 0.0), axis=0)
        else:
            xa = ls + log_1m_beta
            xb = lt + log_beta
            mx = tl.maximum(xa, xb)
            lm = mx + tl.log(tl.exp(xa - mx) + tl.exp(xb - mx))
            term = beta * t * (lt - lm) + (1.0 - beta) * s * (ls - lm)
            sg += tl.sum(tl.where(mask, (1.0 - beta) * s * (ls - lm), 0.0), axis=0)
        loss += tl.sum(tl.where(mask, term, 0.0), axis=0)
    tl.store(LOSS + row, loss)
    if COMPUTE_GRAD:
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            ls = tl.load(zs_row + start + cols, mask=mask, other=0.0) * inv_temp - lse_s
            lt = tl.load(zt_row + start + cols, mask=mask, other=0.0) * inv_temp - lse_t
            s = tl.exp(ls)
            if KIND == 0:
                g = s - tl.exp(lt)
            elif KIND == 1:
                g = s * (ls - lt - sg)
            else:
                xa = ls + log_1m_beta
                xb = lt + log_beta
                mx = tl.maximum(xa, xb)
                lm = mx + tl.log(tl.exp(xa - mx) + tl.exp(xb - mx))
                g = s * ((1.0 - beta) * (ls - lm) - sg)
            tl.store(zs_row + start + cols, g * inv_temp, mask=mask)


def distill_rows(
    zs: torch.Tensor, zt: torch.Tensor, kind: str, beta: float, temperature: float, compute_grad: bool
) -> torch.Tensor:
    """Row function (contract of ``kernels.reference.distill_rows``): zs, zt ``(C, V)`` fp32 contiguous
    -> loss ``(C,)`` fp32; with compute_grad zs is overwritten with d loss / d zs."""
    assert zs.dtype == torch.float32 and zt.dtype == torch.float32, "logit chunks must be fp32"
    assert zs.shape == zt.shape and zs.dim() == 2, f"chunks must both be (C, V), got {zs.shape}, {zt.shape}"
    check_contiguous(zs=zs, zt=zt)
    kind = resolve_kind(kind, beta)
    C, V = zs.shape
    loss = torch.full((C,), float("nan"), dtype=torch.float32, device=zs.device)
    if C:
        b = float(beta) if kind == "jsd" else 0.5
        _distill_rows_kernel[(C,)](
            zs, zt, loss, V, 1.0 / temperature, b, math.log(b), math.log(1.0 - b),
            KIND=_KIND[kind], COMPUTE_GRAD=compute_grad, BLOCK_V=min(next_pow2(V), 4096),
        )
    return loss
