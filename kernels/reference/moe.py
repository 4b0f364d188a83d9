"""Torch reference for MoE dispatch: permute tokens by expert, grouped expert MLP, weighted combine.

Layout. The permuted buffer holds exactly one row per (token, slot) pair, ``R = T * K`` rows, sorted by
expert (token order within an expert) with no padding: expert ``e`` owns rows ``offsets[e]:offsets[e+1]``.
Every shape is thus known from ``T``, ``K`` and ``E`` alone; only the segment boundaries depend on the
router. A grouped GEMM multiplies each segment by its own expert's weight in place -- no row is padded to
the busiest expert and no weight is gathered or copied (an idle expert's segment is empty and its weight
gradient zero).

The segment GEMMs are ``torch.nn.functional.grouped_mm`` (one call over all experts) where it accepts the
operands -- 16-byte-aligned rows, i.e. feature sizes a multiple of 4 (fp32) / 8 (bf16); on CUDA bf16 only --,
else a loop of ``mm`` over ``torch.split`` segments (views; no copies). Scatters write each row once and the reductions
(combine; the permute's backward) sum a token's K rows in slot order, so results are deterministic.

The forward/backward helpers (``*_fwd``, ``*_bwd``) are shared by this module's autograd Functions (the
differentiable reference) and by the ``moeflow::`` custom ops of ``kernels.ops``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class MoeRouting(NamedTuple):
    """Where each (token, slot) lives in the expert-sorted buffer.

    rows: ``(T, K)`` int64, row of slot (t, k); row_slot: ``(R,)`` int64, slot ``t*K + k`` held by each row
    (``R = T*K``; the inverse permutation of ``rows``); offsets: ``(E + 1,)`` int64, expert e's rows are
    ``offsets[e]:offsets[e+1]``.
    """

    rows: torch.Tensor
    row_slot: torch.Tensor
    offsets: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.row_slot.numel()

    @property
    def num_experts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def counts(self) -> torch.Tensor:
        """``(E,)`` int64 rows (tokens) per expert."""
        return self.offsets.diff()


def routing_tensors(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, row_slot, offsets) of ``MoeRouting`` for topk_idx ``(T, K)`` (stable sort by expert)."""
    flat = topk_idx.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    assert counts.numel() == num_experts, f"topk_idx holds expert ids >= num_experts={num_experts}"
    assert flat.numel() == 0 or int(flat.min()) >= 0, "topk_idx holds negative expert ids"
    order = torch.argsort(flat, stable=True)
    rows = torch.empty_like(flat)
    rows[order] = torch.arange(flat.numel(), device=flat.device)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return rows.view(topk_idx.shape), order, offsets


def moe_routing(topk_idx: torch.Tensor, num_experts: int) -> MoeRouting:
    """Sort the (token, slot) pairs by expert (stable: token order within an expert), no padding."""
    assert topk_idx.dim() == 2, f"topk_idx must be (T, K), got {tuple(topk_idx.shape)}"
    assert not topk_idx.is_floating_point(), f"topk_idx must be integer, got {topk_idx.dtype}"
    return MoeRouting(*routing_tensors(topk_idx, num_experts))


# --------------------------------------------------------------------------------- segment GEMMs
def _gmm_ok(*ts: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: CPU, or CUDA bf16 on sm_80+; 16-byte aligned data and
    strides (none 0: broadcast)."""
    if not hasattr(F, "grouped_mm"):
        return False
    dev = ts[0].device
    if dev.type == "cuda" and (ts[0].dtype != torch.bfloat16 or torch.cuda.get_device_capability(dev) < (8, 0)):
        return False  # CUDA's grouped_mm: bf16 on sm_80+
    if dev.type not in ("cpu", "cuda"):
        return False
    for t in ts:
        size = t.element_size()
        if t.data_ptr() % 16 or any(s == 0 or (s != 1 and (s * size) % 16) for s in t.stride()):
            return False
    return True


def _sizes(offsets: torch.Tensor) -> list[int]:
    return offsets.diff().tolist()


def segment_mm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transpose_w: bool = True) -> torch.Tensor:
    """Per segment e of a's rows: ``a_e @ w[e].T`` (transpose_w; w ``(E, N, Kd)``) or ``a_e @ w[e]``
    (w ``(E, Kd, N)``)."""
    b = w.transpose(1, 2) if transpose_w else w
    if a.shape[0] and _gmm_ok(a, b):
        return F.grouped_mm(a, b, offs=offsets[1:].to(torch.int32))
    parts = [seg @ b[e] for e, seg in enumerate(a.split(_sizes(offsets)))]
    return torch.cat(parts) if parts else a.new_zeros(0, b.shape[2])


def segment_dw(dy: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``dW[e] = dy_e^T x_e`` per segment -> ``(E, Dout, Din)`` in x.dtype (zero for an idle expert)."""
    E = offsets.numel() - 1
    # CPU: F.grouped_mm's 2-D x 2-D (offsets on K) form measured 20x slower than this loop with 2 threads on a
    # busy machine (equal on 1 thread), so it is used on CUDA only.
    if dy.shape[0] and dy.device.type == "cuda" and _gmm_ok(dy.t(), x):
        return F.grouped_mm(dy.t(), x, offs=offsets[1:].to(torch.int32))
    if not dy.shape[0]:
        return x.new_zeros(E, dy.shape[1], x.shape[1])
    return torch.stack([g.t() @ s for g, s in zip(dy.split(_sizes(offsets)), x.split(_sizes(offsets)), strict=True)])


# ---------------------------------------------------------------------------- permute and combine
def permute_fwd(x: torch.Tensor, row_slot: torch.Tensor, K: int) -> torch.Tensor:
    """x_perm[r] = x[row_slot[r] // K] -- a gather."""
    return x.index_select(0, row_slot // K)


def permute_bwd(dx_perm: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """dx[t] = sum_k dx_perm[rows[t, k]] (slot order) -- a gather, no atomics."""
    T, K = rows.shape
    return dx_perm.index_select(0, rows.reshape(-1)).view(T, K, -1).sum(1)


def combine_fwd(y_perm: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k w[t,k] y[rows[t,k]] (fp32 accumulation, slot order), in y's dtype."""
    T, K = rows.shape
    return _weighted_slots(y_perm.index_select(0, rows.reshape(-1)).view(T, K, -1), weight)


def _weighted_slots(y_TKD: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_k w[t,k] y[t,k] over the slots in order, accumulated in fp32, in y's dtype."""
    return (weight.float().unsqueeze(-1) * y_TKD).sum(1).to(y_TKD.dtype)


def combine_bwd(dout, y_perm, rows, row_slot, weight, need_dy: bool = True, need_dw: bool = True):
    """dy[r] = w[slot] dout[t] for the slot (t, k) held by row r; dw[t,k] = <dout[t], y[rows[t,k]]>."""
    T, K = rows.shape
    D = y_perm.shape[1]
    dout32 = dout.float()
    dy = dw = None
    if need_dy:
        dy_slots = (weight.float().unsqueeze(-1) * dout32.unsqueeze(1)).view(T * K, D).to(y_perm.dtype)
        dy = dy_slots.index_select(0, row_slot)
    if need_dw:
        y_tk = y_perm.index_select(0, rows.reshape(-1)).view(T, K, D)
        dw = (y_tk * dout32.unsqueeze(1)).sum(-1).to(weight.dtype)
    return dy, dw


# ------------------------------------------------------------------------------- expert SwiGLU MLP
def swiglu_mlp_fwd(x, w_gate, w_up, w_down, offsets):
    """Per segment of expert e: g = x Wg^T, u = x Wu^T, y = (silu(g) u) Wd^T -> (y, g, u)."""
    g = segment_mm(x, w_gate, offsets)
    u = segment_mm(x, w_up, offsets)
    return segment_mm(F.silu(g) * u, w_down, offsets), g, u


def swiglu_mlp_bwd(dy, x, w_gate, w_up, w_down, offsets, g, u):
    """Backward of ``swiglu_mlp_fwd`` (silu(g) recomputed from the saved g, u):
    da = dy Wd, dWd = dy^T a, dg = da u silu'(g), du = da silu(g), dx = dg Wg + du Wu, dWg = dg^T x,
    dWu = du^T x;  silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)."""
    dy = dy.to(x.dtype)  # autocast may hand back an fp32 gradient for a bf16 output
    s = torch.sigmoid(g)
    silu = g * s
    da = segment_mm(dy, w_down, offsets, transpose_w=False)
    dw_down = segment_dw(dy, silu * u, offsets)
    du = da * silu
    dg = da.mul_(u).mul_(s * (1 + g * (1 - s)))
    dx = segment_mm(dg, w_gate, offsets, transpose_w=False).add_(segment_mm(du, w_up, offsets, transpose_w=False))
    return dx, segment_dw(dg, x, offsets), segment_dw(du, x, offsets), dw_down


def ffn_fwd(x, topk_idx, topk_weight, w_gate, w_up, w_down, mlp=None):
    """The routed experts' forward without autograd bookkeeping: routing, permute, the grouped SwiGLU MLP
    and the combine of the ``moeflow::`` ops on this backend, in the same arithmetic (the same bits).

    Every shape follows from T, K and E (counts by ``scatter_add``, not ``bincount``), so ``torch.compile``
    traces it whole; ``mlp`` (default ``swiglu_mlp_fwd``) may be the ``moeflow::grouped_swiglu_mlp`` op,
    which a trace keeps as one call (``F.grouped_mm`` has no fp32 CPU meta function to trace).
    """
    T, K = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # = routing_tensors' row_slot: row r holds slot order[r]
    counts = torch.zeros(w_gate.shape[0], dtype=flat.dtype, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    y = (mlp or swiglu_mlp_fwd)(permute_fwd(x, order, K), w_gate, w_up, w_down, offsets)[0]
    return _weighted_slots(torch.empty_like(y).index_copy_(0, order, y).view(T, K, -1), topk_weight)  # slot order


def ffn_gathered(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    """The routed experts as one GEMV per (token, slot) against its expert's rows, written for inductor.

    ``torch.compile`` fuses the gather of ``w[expert]`` into each reduction, so the gathered weights are
    never materialised and the layer is three loops over the routed rows instead of three GEMMs per
    expert (empty ones included); eager, the gathers would copy the weights. Products and sums in fp32,
    each projection rounded to x's dtype, as the grouped GEMMs do; combine as ``ffn_fwd``'s.
    """
    T, K = topk_idx.shape
    e_A = topk_idx.reshape(-1)
    x_AD = x.float().repeat_interleave(K, 0)
    g_AI = (x_AD[:, None, :] * w_gate[e_A].float()).sum(-1).to(x.dtype)
    u_AI = (x_AD[:, None, :] * w_up[e_A].float()).sum(-1).to(x.dtype)
    h_AI = (F.silu(g_AI) * u_AI).float()
    y_TKD = (h_AI[:, None, :] * w_down[e_A].float()).sum(-1).to(x.dtype).view(T, K, -1)
    return _weighted_slots(y_TKD, topk_weight)


def gathered_pays(T: int, K: int, w_gate: torch.Tensor) -> bool:
    """Whether compiled ``ffn_gathered`` beats the grouped GEMMs for T tokens: at most one routed row per
    expert on average (it then reads no more weight bytes than they do), or up to 16 when one expert's
    weights fit a core's L2 (256 KiB), where rereading them is cheap. ``python -m bench.moe_decode``
    (``bench/results/moe_decode_cpu.md``) times both forms: on its CPU gathered was faster up to 16 rows per
    expert at 1 and 2 threads (1.15x and up), and 0.84-1.12x across runs at 24-32 rows on 1 thread."""
    E, I, D = w_gate.shape
    rows_per_expert = T * K / E
    return rows_per_expert <= 1 or (rows_per_expert <= 16 and 3 * I * D * w_gate.element_size() <= 256 * 1024)


# ------------------------------------------------------------------ differentiable reference API
class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, row_slot):
        ctx.save_for_backward(rows)
        return permute_fwd(x, row_slot, rows.shape[1])

    @staticmethod
    def backward(ctx, dx_perm):
        (rows,) = ctx.saved_tensors
        return permute_bwd(dx_perm, rows), None, None


def moe_permute(x: torch.Tensor, routing: MoeRouting) -> torch.Tensor:
    """x ``(T, D)`` -> x_perm ``(T*K, D)``: each token copied to its K expert-sorted rows."""
    return _Permute.apply(x, routing.rows, routing.row_slot)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_perm, rows, row_slot, weight):
        ctx.save_for_backward(y_perm, rows, row_slot, weight)
        return combine_fwd(y_perm, rows, weight)

    @staticmethod
    def backward(ctx, dout):
        y_perm, rows, row_slot, weight = ctx.saved_tensors
        dy, dw = combine_bwd(dout, y_perm, rows, row_slot, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[3])
        return dy, None, None, dw


def moe_combine(y_perm: torch.Tensor, routing: MoeRouting, topk_weight: torch.Tensor) -> torch.Tensor:
    """y_perm ``(T*K, D)``, topk_weight ``(T, K)`` -> ``(T, D)`` = sum_k w[t, k] y_perm[rows[t, k]] in y dtype."""
    return _Combine.apply(y_perm, routing.rows, routing.row_slot, topk_weight)


class _GroupedGemm(torch.autograd.Function):
    # Per segment of expert e:  y_e = x_e W_e^T.   dx_e = dy_e W_e;   dW_e = dy_e^T x_e
    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return segment_mm(x, w, offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dy = dy.to(x.dtype)  # autocast may hand back an fp32 gradient
        dx = segment_mm(dy, w, offsets, transpose_w=False) if ctx.needs_input_grad[0] else None
        dw = segment_dw(dy, x, offsets) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, routing: MoeRouting) -> torch.Tensor:
    """Per-segment ``y[rows of e] = x[rows of e] @ w[e].T``.

    x: ``(T*K, Din)`` expert-sorted rows; w: ``(E, Dout, Din)`` (stacked nn.Linear weights) -> ``(T*K, Dout)``.
    """
    return _GroupedGemm.apply(x, w, routing.offsets)


class _GroupedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, offsets):
        y, g, u = swiglu_mlp_fwd(x, w_gate, w_up, w_down, offsets)
        ctx.save_for_backward(x, w_gate, w_up, w_down, offsets, g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*swiglu_mlp_bwd(dy, *ctx.saved_tensors), None)


def grouped_swiglu_mlp(
    x_perm: torch.Tensor, routing: MoeRouting, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Experts' SwiGLU MLP on the permuted rows: ``down_e(silu(gate_e x) * up_e x)`` per segment.

    x_perm ``(T*K, D)``; w_gate, w_up ``(E, I, D)``; w_down ``(E, D, I)`` -> ``(T*K, D)``.
    """
    return _GroupedSwiGLU.apply(x_perm, w_gate, w_up, w_down, routing.offsets)


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
    """
    routing = moe_routing(topk_idx, w_gate.shape[0])
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
