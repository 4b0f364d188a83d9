"""Torch reference for MoE dispatch: permute tokens by expert, grouped expert MLP, weighted combine.

Layout. The permuted buffer holds one row per (token, slot) pair, grouped by expert in token order, each
expert's segment zero-padded to a multiple of ``routing.block`` rows. The buffer is thus ``nb`` blocks of
``block`` rows and block ``b`` belongs to expert ``block_expert[b]`` -- a grouped GEMM is one batched GEMM
over blocks (``torch.bmm`` here; one Triton program per block tile on GPU, as vLLM's fused MoE does).
With ``block = None`` the block is the largest expert's token count, so every expert is one block: the
grouped GEMM is a single ``torch.bmm`` over ``(E, C, D)`` with the weights as they are (fast on CPU).

No function here loops over experts in Python. Scatters write each row once and the reductions
(combine; the permute's backward) sum a token's K rows in slot order, so results are deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class MoeRouting(NamedTuple):
    """Where each (token, slot) lives in the permuted buffer.

    rows: ``(T, K)`` int64, row of slot (t, k); row_slot: ``(R,)`` int64, slot ``t*K + k`` held by each row
    (``T*K`` for pad rows); block_expert: ``(nb,)`` int64 expert of each block (non-decreasing); block:
    rows per block; counts: ``(E,)`` int64 real (unpadded) rows per expert.
    """

    rows: torch.Tensor
    row_slot: torch.Tensor
    block_expert: torch.Tensor
    block: int
    counts: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.block_expert.numel() * self.block

    @property
    def num_experts(self) -> int:
        return self.counts.numel()


def moe_routing(topk_idx: torch.Tensor, num_experts: int, block: int | None = None) -> MoeRouting:
    """Sort the (token, slot) pairs by expert (stable: token order within an expert) into blocks.

    topk_idx ``(T, K)`` integer. block: rows per block (each expert's segment is padded to a multiple of
    it); None = one block per expert sized to the busiest expert.
    """
    assert topk_idx.dim() == 2, f"topk_idx must be (T, K), got {tuple(topk_idx.shape)}"
    assert not topk_idx.is_floating_point(), f"topk_idx must be integer, got {topk_idx.dtype}"
    flat = topk_idx.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    assert counts.numel() == num_experts, f"topk_idx holds expert ids >= num_experts={num_experts}"
    if block is None:
        block = max(int(counts.max()) if flat.numel() else 1, 1)
    assert block >= 1, f"block must be >= 1, got {block}"
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    seg_blocks = (counts + block - 1) // block
    seg_start = (torch.cumsum(seg_blocks, 0) - seg_blocks) * block  # first row of each expert
    rank = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    rows = torch.empty_like(flat)
    rows[order] = seg_start[sorted_e] + rank
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), seg_blocks)
    row_slot = torch.full((block_expert.numel() * block,), flat.numel(), dtype=torch.long, device=flat.device)
    row_slot[rows] = torch.arange(flat.numel(), device=flat.device)
    return MoeRouting(rows.view(topk_idx.shape), row_slot, block_expert, block, counts)


class _Permute(torch.autograd.Function):
    # x_perm[r] = x[row_slot[r] // K] (pad rows: 0)  =>  dx[t] = sum_k dx_perm[rows[t, k]]  (slot order)
    # Both directions are gathers (index_select), never scatters: no zero-filled buffers, no atomics.
    @staticmethod
    def forward(ctx, x, rows, row_slot):
        x_ext = torch.cat([x, x.new_zeros(1, x.shape[1])])  # row T = the zero row pad rows read
        ctx.save_for_backward(rows)
        return x_ext.index_select(0, row_slot // rows.shape[1])

    @staticmethod
    def backward(ctx, dx_perm):
        (rows,) = ctx.saved_tensors
        T, K = rows.shape
        return dx_perm.index_select(0, rows.reshape(-1)).view(T, K, -1).sum(1), None, None


def moe_permute(x: torch.Tensor, routing: MoeRouting) -> torch.Tensor:
    """x ``(T, D)`` -> x_perm ``(routing.num_rows, D)``: each token copied to its K rows, pad rows zero."""
    return _Permute.apply(x, routing.rows, routing.row_slot)


class _Combine(torch.autograd.Function):
    # out[t] = sum_k w[t,k] y[rows[t,k]]          (fp32 accumulation, slot order)
    # dy[r] = w[slot] dout[t] for the slot (t, k) held by row r (pad rows: 0);  dw[t,k] = <dout[t], y[rows[t,k]]>
    @staticmethod
    def forward(ctx, y_perm, rows, row_slot, weight):
        T, K = rows.shape
        y_tk = y_perm.index_select(0, rows.reshape(-1)).view(T, K, -1)
        out = (weight.float().unsqueeze(-1) * y_tk).sum(1)  # fp32 (promoted), K summed in slot order
        ctx.save_for_backward(y_tk, row_slot, weight)
        return out.to(y_perm.dtype)

    @staticmethod
    def backward(ctx, dout):
        y_tk, row_slot, weight = ctx.saved_tensors
        T, K, D = y_tk.shape
        dout32 = dout.float()
        dy = dw = None
        if ctx.needs_input_grad[0]:
            dy_slots = (weight.float().unsqueeze(-1) * dout32.unsqueeze(1)).view(T * K, D).to(y_tk.dtype)
            dy = torch.cat([dy_slots, dy_slots.new_zeros(1, D)]).index_select(0, row_slot)
        if ctx.needs_input_grad[3]:
            dw = (y_tk * dout32.unsqueeze(1)).sum(-1).to(weight.dtype)
        return dy, None, None, dw


def moe_combine(y_perm: torch.Tensor, routing: MoeRouting, topk_weight: torch.Tensor) -> torch.Tensor:
    """y_perm ``(R, D)``, topk_weight ``(T, K)`` -> ``(T, D)`` = sum_k w[t, k] y_perm[rows[t, k]] in y dtype."""
    return _Combine.apply(y_perm, routing.rows, routing.row_slot, topk_weight)


def _per_block(w: torch.Tensor, block_expert: torch.Tensor) -> torch.Tensor:
    """Weights of each block's expert; the tensor itself when blocks are exactly experts 0..E-1."""
    if block_expert.numel() == w.shape[0]:  # non-decreasing and one per expert => identity
        return w
    return w[block_expert]


def _per_expert(dw_blocks: torch.Tensor, block_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    if block_expert.numel() == num_experts:
        return dw_blocks
    return dw_blocks.new_zeros((num_experts, *dw_blocks.shape[1:])).index_add_(0, block_expert, dw_blocks)


class _GroupedGemm(torch.autograd.Function):
    # Per block b of expert e:  y_b = x_b W_e^T.   dx_b = dy_b W_e;   dW_e = sum_{b of e} dy_b^T x_b
    @staticmethod
    def forward(ctx, x, w, block_expert, block):
        nb = block_expert.numel()
        y = torch.bmm(x.view(nb, block, -1), _per_block(w, block_expert).transpose(1, 2))
        ctx.save_for_backward(x, w, block_expert)
        ctx.block = block
        return y.view(nb * block, -1)

    @staticmethod
    def backward(ctx, dy):
        x, w, block_expert = ctx.saved_tensors
        nb, block = block_expert.numel(), ctx.block
        dy_b = dy.to(x.dtype).reshape(nb, block, -1)  # autocast may hand back an fp32 gradient
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.bmm(dy_b, _per_block(w, block_expert)).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = _per_expert(torch.bmm(dy_b.transpose(1, 2), x.view(nb, block, -1)), block_expert, w.shape[0])
        return dx, dw, None, None


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, routing: MoeRouting) -> torch.Tensor:
    """Per-segment ``y[rows of e] = x[rows of e] @ w[e].T``.

    x: ``(routing.num_rows, Din)``; w: ``(E, Dout, Din)`` (stacked nn.Linear weights) -> ``(R, Dout)``.
    """
    return _GroupedGemm.apply(x, w, routing.block_expert, routing.block)


class _GroupedSwiGLU(torch.autograd.Function):
    # Per block of expert e, rows x (B, D):  g = x Wg^T,  u = x Wu^T,  a = silu(g) u,  y = a Wd^T.
    # Backward (silu(g) and a recomputed from the saved g, u):
    #   da = dy Wd,  dWd = dy^T a,  dg = da u silu'(g),  du = da silu(g),
    #   dx = dg Wg + du Wu,  dWg = dg^T x,  dWu = du^T x;   silu'(g) = s (1 + g (1 - s)), s = sigmoid(g).
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, block_expert, block):
        nb = block_expert.numel()
        xb = x.view(nb, block, -1)
        g = torch.bmm(xb, _per_block(w_gate, block_expert).transpose(1, 2))
        u = torch.bmm(xb, _per_block(w_up, block_expert).transpose(1, 2))
        a = F.silu(g).mul_(u)
        y = torch.bmm(a, _per_block(w_down, block_expert).transpose(1, 2))
        ctx.save_for_backward(x, w_gate, w_up, w_down, block_expert, g, u)
        ctx.block = block
        return y.view(x.shape[0], -1)

    @staticmethod
    def backward(ctx, dy):
        x, w_gate, w_up, w_down, block_expert, g, u = ctx.saved_tensors
        dy = dy.to(x.dtype)  # autocast may hand back an fp32 gradient for a bf16 output
        nb, E = block_expert.numel(), w_gate.shape[0]
        xb = x.view(nb, ctx.block, -1)
        dy = dy.reshape(nb, ctx.block, -1)
        s = torch.sigmoid(g)
        silu = g * s
        da = torch.bmm(dy, _per_block(w_down, block_expert))
        dw_down = _per_expert(torch.bmm(dy.transpose(1, 2), silu * u), block_expert, E)
        du = da * silu
        dg = da.mul_(u).mul_(s * (1 + g * (1 - s)))
        dx = torch.bmm(dg, _per_block(w_gate, block_expert)).baddbmm_(du, _per_block(w_up, block_expert))
        dw_gate = _per_expert(torch.bmm(dg.transpose(1, 2), xb), block_expert, E)
        dw_up = _per_expert(torch.bmm(du.transpose(1, 2), xb), block_expert, E)
        return dx.view(x.shape), dw_gate, dw_up, dw_down, None, None


def grouped_swiglu_mlp(
    x_perm: torch.Tensor, routing: MoeRouting, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Experts' SwiGLU MLP on the permuted rows: ``down_e(silu(gate_e x) * up_e x)`` per segment.

    x_perm ``(R, D)``; w_gate, w_up ``(E, I, D)``; w_down ``(E, D, I)`` -> ``(R, D)`` (pad rows stay 0).
    """
    return _GroupedSwiGLU.apply(x_perm, w_gate, w_up, w_down, routing.block_expert, routing.block)


def moe_ffn(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Routed experts: ``out[t] = sum_k topk_weight[t,k] down_e(silu(gate_e x_t) * up_e x_t)``, e = topk_idx[t,k].

    x ``(T, D)``; topk_idx ``(T, K)`` int64; topk_weight ``(T, K)`` fp32 or x.dtype;
    w_gate, w_up ``(E, I, D)``; w_down ``(E, D, I)`` -> ``(T, D)`` in x.dtype.
    One block per expert (a single bmm per projection) unless the padding would more than double the
    rows (a badly unbalanced router); then blocks of 64 rows bound the padding.
    """
    E = w_gate.shape[0]
    routing = moe_routing(topk_idx, E)
    if routing.num_rows > 2 * topk_idx.numel() + 64 * E:
        routing = moe_routing(topk_idx, E, block=64)
    y = grouped_swiglu_mlp(moe_permute(x, routing), routing, w_gate, w_up, w_down)
    return moe_combine(y, routing, topk_weight)


def moe_ffn_loop(x, topk_idx, topk_weight, w_gate, w_up, w_down) -> torch.Tensor:
    """Readable per-expert loop: a test oracle and the benchmark's baseline, never dispatched."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w_gate.shape[0]):
        t, k = (topk_idx == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        xe = x[t]
        ye = F.linear(F.silu(F.linear(xe, w_gate[e])) * F.linear(xe, w_up[e]), w_down[e])
        out = out.index_add(0, t, ye.float() * topk_weight[t, k, None].float())
    return out.to(x.dtype)
