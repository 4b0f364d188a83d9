"""Cross-entropy row kernel for the fused linear + cross-entropy (Triton).

The host engine (``kernels.reference.chunked``) computes one chunk of logits ``z = h W^T`` at a time
with a GEMM and calls ``cross_entropy_rows``; this kernel turns the chunk into per-token losses and,
in place, into d loss / d z, so no second ``C x V`` buffer is needed. Per row (online softmax, two passes
over V): with ``zt = z / T``, ``lse = logsumexp(zt)``:
``loss = lse - zt[y] + z_loss lse^2`` (0 if y == ignore_index) and
``d loss / d z = (softmax(zt) (1 + 2 z_loss lse) - onehot(y)) / T`` (0 if ignored).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_contiguous, next_pow2


@triton.jit
def _ce_rows_kernel(Z, TGT, LOSS, V, ignore_index, z_loss, inv_temp,
                    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * V
    tgt = tl.load(TGT + row)
    valid = tgt != ignore_index
    cols = tl.arange(0, BLOCK_V)
    # pass 1: running max m and running sum d of exp(zt - m)
    m = tl.full((), float("-inf"), tl.float32)
    d = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        zt = tl.load(z_row + start + cols, mask=start + cols < V, other=float("-inf")) * inv_temp
        m_new = tl.maximum(m, tl.max(zt, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(zt - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    safe_t = tl.where(valid, tgt, 0)
    z_t = tl.load(z_row + safe_t) * inv_temp
    loss = lse - z_t + z_loss * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if COMPUTE_GRAD:
        # pass 2: overwrite the logits with the gradient
        g_scale = tl.where(valid, inv_temp, 0.0)
        p_scale = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            c = start + cols
            zt = tl.load(z_row + c, mask=c < V, other=0.0) * inv_temp
            g = tl.exp(zt - lse) * p_scale - tl.where(c == safe_t, 1.0, 0.0)
            tl.store(z_row + c, g * g_scale, mask=c < V)


def cross_entropy_rows(
    z: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    z_loss: float,
    temperature: float,
    compute_grad: bool,
) -> torch.Tensor:
    """Row function (same contract as ``kernels.reference.cross_entropy_rows``): z ``(C, V)`` fp32
    contiguous (overwritten with d loss / d z if compute_grad), targets ``(C,)`` int64 -> loss ``(C,)`` fp32."""
    assert z.dtype == torch.float32 and z.dim() == 2, f"logits chunk must be (C, V) fp32, got {z.dtype}"
    assert targets.shape == (z.shape[0],) and targets.dtype == torch.long, "targets must be (C,) int64"
    check_contiguous(z=z, targets=targets)
    C, V = z.shape
    loss = torch.full((C,), float("nan"), dtype=torch.float32, device=z.device)
    if C:
        _ce_rows_kernel[(C,)](
            z, targets, loss, V, ignore_index, float(z_loss), 1.0 / temperature,
            COMPUTE_GRAD=compute_grad, BLOCK_V=min(next_pow2(V), 4096),
        )
    return loss
