"""moeflow's kernels as ``torch.library`` custom ops (namespace ``moeflow``): ``torch.compile`` traces
through them as single graph nodes, with no graph break.

Every op picks its backend inside (``kernels.backend.resolve``: the Triton kernels or the torch
reference), has a fake implementation (output shapes and dtypes from the input shapes alone: what the
compiler traces) and, where it has a gradient, an autograd formula (``register_autograd``) whose heavy
part is another op (``*_backward``). The public, checked entry points are in ``kernels/__init__.py``;
these ops assume checked inputs.

Work the backward needs is returned by the forward as extra outputs (the fused losses' precomputed
gradients, the expert MLP's pre-activations, the FP8 operands); outputs not needed are empty tensors.
Outputs are always contiguous, as the fake implementations say.

MoE: with the unpadded layout (``kernels.reference.moe``) every MoE shape follows from T, K, E and the
widths; the per-expert counts are data that only the ops' insides read (the ``offsets`` tensor).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from . import reference as ref
from .backend import resolve, triton_op
from .reference.chunked import chunked_backward, chunked_forward, keeps_rows, scale_precomputed
from .reference.cross_entropy import ce_row_fn
from .reference.distill import distill_row_fn, logits_distill_bwd, logits_distill_fwd, logits_row_fn

F32 = torch.float32


def _triton(t: Tensor, op: str, fp8: bool = False) -> bool:
    return resolve(t.device, op, needs_fp8=fp8) == "triton"


def _none(t: Tensor, flag: bool = True) -> Tensor | None:
    """An optional result: None for the empty placeholder of an output that was not needed."""
    return t if flag and t.numel() else None


def _or_empty(t: Tensor | None, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype) if t is None else t.contiguous()


# ---------------------------------------------------------------------------------------- RMSNorm
@custom_op("moeflow::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """-> (y, s = x + residual; empty without a residual)."""
    if _triton(x, "rms_norm"):
        D = x.shape[-1]
        res2d = None if residual is None else residual.reshape(-1, D).contiguous()
        y, s, _ = triton_op("rms_norm").rms_norm_fwd(x.reshape(-1, D).contiguous(), weight.contiguous(), eps, res2d)
        return y.view(x.shape), x.new_empty(0) if s is None else s.view(x.shape)
    if residual is None:
        return ref.rms_norm(x, weight, eps).contiguous(), x.new_empty(0)
    y, s = ref.rms_norm(x, weight, eps, residual)
    return y.contiguous(), s.contiguous()


@rms_norm.register_fake
def _(x, weight, eps, residual):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else 0)


@custom_op("moeflow::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    dy: Tensor, ds_out: Tensor | None, x: Tensor, weight: Tensor, eps: float, residual: Tensor | None
) -> tuple[Tensor, Tensor]:
    """-> (d x (= d residual), d weight); the statistics are recomputed (one cheap pass over x)."""
    if _triton(x, "rms_norm"):
        tr, D = triton_op("rms_norm"), x.shape[-1]
        x2d, w = x.reshape(-1, D).contiguous(), weight.contiguous()
        res2d = None if residual is None else residual.reshape(-1, D).contiguous()
        _, s, rstd = tr.rms_norm_fwd(x2d, w, eps, res2d)
        ds2d = None if ds_out is None else ds_out.reshape(-1, D).contiguous()
        dx, dw = tr.rms_norm_bwd(dy.reshape(-1, D).contiguous(), ds2d, x2d if s is None else s, w, rstd)
        return dx.view(x.shape), dw.to(weight.dtype)
    dx, dw = ref.rms_norm_bwd(dy, ds_out, x, weight, eps, residual)
    return dx.contiguous(), dw


@rms_norm_backward.register_fake
def _(dy, ds_out, x, weight, eps, residual):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps, residual = inputs
    ctx.eps, ctx.has_res = eps, residual is not None
    ctx.save_for_backward(x, weight, residual)


def _rms_norm_grad(ctx, dy, ds):
    x, weight, residual = ctx.saved_tensors
    dx, dw = torch.ops.moeflow.rms_norm_backward(dy, ds if ctx.has_res else None, x, weight, ctx.eps, residual)
    return dx, dw, None, dx if ctx.has_res else None


rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


# ----------------------------------------------------------------------------------------- SwiGLU
@custom_op("moeflow::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    if _triton(gate, "swiglu"):
        return triton_op("swiglu").swiglu_fwd(gate.contiguous(), up.contiguous())
    return ref.swiglu(gate, up).contiguous()


@swiglu.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@custom_op("moeflow::swiglu_backward", mutates_args=())
def swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    if _triton(gate, "swiglu"):
        return triton_op("swiglu").swiglu_bwd(dy.contiguous(), gate.contiguous(), up.contiguous())
    dg, du = ref.swiglu_bwd(dy, gate, up)
    return dg.contiguous(), du.contiguous()


@swiglu_backward.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dy):
    return torch.ops.moeflow.swiglu_backward(dy, *ctx.saved_tensors)


swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


# ------------------------------------------------------------------------------------------- RoPE
@custom_op("moeflow::apply_rope", mutates_args=())
def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    if _triton(x, "apply_rope"):
        return triton_op("rope").rope(x.contiguous(), cos.contiguous(), sin.contiguous(), 1.0)
    return ref.apply_rope(x, cos, sin).contiguous()


@apply_rope.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _rope_grad(ctx, dy):
    cos, sin = ctx.saved_tensors  # a rotation's adjoint is the rotation by the opposite angle
    return torch.ops.moeflow.apply_rope(dy, cos, -sin), None, None


apply_rope.register_autograd(_rope_grad, setup_context=_rope_setup)


# --------------------------------------------------------------------------- fused linear + losses
def _chunked(h, w, valid, row_fn, reduction, chunk, need_dh, need_dw):
    out, dh, dw = chunked_forward(h.contiguous(), w.contiguous(), valid, row_fn, reduction, chunk, need_dh, need_dw)
    return out, _or_empty(dh, h), _or_empty(dw, h, F32)


def _chunked_fake(h, w, reduction, chunk, need_dh, need_dw):
    pre = reduction != "none"
    out = h.new_empty((h.shape[0],) if reduction == "none" else (), dtype=F32)
    if keeps_rows(h.shape[0], reduction, chunk, need_dh, need_dw):  # the kept rows G in dh's place
        return out, h.new_empty((h.shape[0], w.shape[0]), dtype=F32), h.new_empty(0, dtype=F32)
    dh = h.new_empty(h.shape if pre and need_dh else 0)
    return out, dh, h.new_empty(w.shape if pre and need_dw else 0, dtype=F32)


def _chunked_setup(ctx, saved_if_none, output, reduction, w):
    """Save what the backward needs: the forward's gradients (mean/sum), or for none the inputs and, when
    the forward kept them (`keeps_rows`), the rows d loss_t / d logits_t it returned in dh's place."""
    ctx.reduction, ctx.w_dtype = reduction, w.dtype
    if reduction == "none":
        ctx.kept_rows = output[1].numel() > 0
        ctx.save_for_backward(*saved_if_none, output[1])
    else:
        ctx.save_for_backward(output[1], output[2])


def _kept_rows_grad(ctx, h, w, valid, rows, grad):
    """Backward of reduction none from the kept rows (plain torch ops: nothing to recompute)."""
    need_dh, need_dw = ctx.needs_input_grad[:2]
    return chunked_backward(h, w, valid, None, h.shape[0], grad, need_dh, need_dw, rows=rows)


def _scaled(ctx, grad):
    dh, dw = ctx.saved_tensors
    return scale_precomputed(_none(dh, ctx.needs_input_grad[0]), _none(dw, ctx.needs_input_grad[1]), grad, ctx.w_dtype)


@custom_op("moeflow::fused_linear_cross_entropy", mutates_args=())
def fused_linear_cross_entropy(
    h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, z_loss: float, reduction: str,
    temperature: float, chunk: int, need_dh: bool, need_dw: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss, d loss / d h, d loss / d weight fp32); the gradients only for mean/sum when asked for. For
    none when `keeps_rows` (one chunk): (losses, d loss_t / d logits_t (N, V) fp32, empty) for the backward."""
    rows = triton_op("cross_entropy").cross_entropy_rows if _triton(h, "fused_linear_cross_entropy") else None
    row_fn = ce_row_fn(targets, ignore_index, z_loss, temperature, rows)
    return _chunked(h, weight, targets != ignore_index, row_fn, reduction, chunk, need_dh, need_dw)


@fused_linear_cross_entropy.register_fake
def _(h, weight, targets, ignore_index, z_loss, reduction, temperature, chunk, need_dh, need_dw):
    return _chunked_fake(h, weight, reduction, chunk, need_dh, need_dw)


@custom_op("moeflow::fused_linear_cross_entropy_backward", mutates_args=())
def fused_linear_cross_entropy_backward(
    h: Tensor, weight: Tensor, targets: Tensor, grad: Tensor, ignore_index: int, z_loss: float,
    temperature: float, chunk: int, need_dh: bool, need_dw: bool,
) -> tuple[Tensor, Tensor]:
    """Backward of reduction ``none`` (per-token losses): recomputes each chunk's logits."""
    rows = triton_op("cross_entropy").cross_entropy_rows if _triton(h, "fused_linear_cross_entropy") else None
    row_fn = ce_row_fn(targets, ignore_index, z_loss, temperature, rows)
    dh, dw = chunked_backward(h.contiguous(), weight.contiguous(), targets != ignore_index, row_fn, chunk, grad,
                              need_dh, need_dw)
    return _or_empty(dh, h), _or_empty(dw, weight)


@fused_linear_cross_entropy_backward.register_fake
def _(h, weight, targets, grad, ignore_index, z_loss, temperature, chunk, need_dh, need_dw):
    return h.new_empty(h.shape if need_dh else 0), weight.new_empty(weight.shape if need_dw else 0)


def _ce_setup(ctx, inputs, output):
    h, weight, targets, ignore_index, z_loss, reduction, temperature, chunk, _, _ = inputs
    ctx.args = (ignore_index, z_loss, temperature, chunk)
    _chunked_setup(ctx, (h, weight, targets), output, reduction, weight)


def _ce_grad(ctx, grad, _dh, _dw):
    if ctx.reduction != "none":
        dh, dw = _scaled(ctx, grad)
    elif ctx.kept_rows:
        h, weight, targets, rows = ctx.saved_tensors
        dh, dw = _kept_rows_grad(ctx, h, weight, targets != ctx.args[0], rows, grad)
    else:
        h, weight, targets, _ = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        dh, dw = torch.ops.moeflow.fused_linear_cross_entropy_backward(h, weight, targets, grad, *ctx.args,
                                                                       need_dh, need_dw)
        dh, dw = _none(dh, need_dh), _none(dw, need_dw)
    return dh, dw, None, None, None, None, None, None, None, None


fused_linear_cross_entropy.register_autograd(_ce_grad, setup_context=_ce_setup)


@custom_op("moeflow::fused_linear_distill_loss", mutates_args=())
def fused_linear_distill_loss(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, valid: Tensor, kind: str, beta: float, temperature: float,
    reduction: str, chunk: int, need_dh: bool, need_dw: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss, d loss / d h_s, d loss / d w_s fp32); the teacher gets no gradient. For none, as
    `fused_linear_cross_entropy`."""
    rows = triton_op("distill").distill_rows if _triton(h_s, "fused_linear_distill_loss") else None
    row_fn = distill_row_fn(h_t, w_t, kind, beta, temperature, rows)
    return _chunked(h_s, w_s, valid, row_fn, reduction, chunk, need_dh, need_dw)


@fused_linear_distill_loss.register_fake
def _(h_s, w_s, h_t, w_t, valid, kind, beta, temperature, reduction, chunk, need_dh, need_dw):
    return _chunked_fake(h_s, w_s, reduction, chunk, need_dh, need_dw)


@custom_op("moeflow::fused_linear_distill_loss_backward", mutates_args=())
def fused_linear_distill_loss_backward(
    h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, valid: Tensor, grad: Tensor, kind: str, beta: float,
    temperature: float, chunk: int, need_dh: bool, need_dw: bool,
) -> tuple[Tensor, Tensor]:
    rows = triton_op("distill").distill_rows if _triton(h_s, "fused_linear_distill_loss") else None
    row_fn = distill_row_fn(h_t, w_t, kind, beta, temperature, rows)
    dh, dw = chunked_backward(h_s.contiguous(), w_s.contiguous(), valid, row_fn, chunk, grad, need_dh, need_dw)
    return _or_empty(dh, h_s), _or_empty(dw, w_s)


@fused_linear_distill_loss_backward.register_fake
def _(h_s, w_s, h_t, w_t, valid, grad, kind, beta, temperature, chunk, need_dh, need_dw):
    return h_s.new_empty(h_s.shape if need_dh else 0), w_s.new_empty(w_s.shape if need_dw else 0)


def _distill_setup(ctx, inputs, output):
    h_s, w_s, h_t, w_t, valid, kind, beta, temperature, reduction, chunk, _, _ = inputs
    ctx.args = (kind, beta, temperature, chunk)
    _chunked_setup(ctx, (h_s, w_s, h_t, w_t, valid), output, reduction, w_s)


def _distill_grad(ctx, grad, _dh, _dw):
    if ctx.reduction != "none":
        dh, dw = _scaled(ctx, grad)
    elif ctx.kept_rows:
        h_s, w_s, _, _, valid, rows = ctx.saved_tensors
        dh, dw = _kept_rows_grad(ctx, h_s, w_s, valid, rows, grad)
    else:
        h_s, w_s, h_t, w_t, valid, _ = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        dh, dw = torch.ops.moeflow.fused_linear_distill_loss_backward(h_s, w_s, h_t, w_t, valid, grad, *ctx.args,
                                                                      need_dh, need_dw)
        dh, dw = _none(dh, need_dh), _none(dw, need_dw)
    return (dh, dw) + (None,) * 10


fused_linear_distill_loss.register_autograd(_distill_grad, setup_context=_distill_setup)


@custom_op("moeflow::distill_loss", mutates_args=())
def distill_loss(
    zs: Tensor, zt: Tensor, valid: Tensor, kind: str, beta: float, temperature: float, reduction: str, chunk: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """-> (loss, d loss / d zs per token: scaled by the reduction for mean/sum; empty unless need_grad)."""
    rows = triton_op("distill").distill_rows if _triton(zs, "distill_loss") else None
    loss, grad = logits_distill_fwd(zs, zt, valid, logits_row_fn(kind, beta, temperature, rows), reduction, chunk,
                                    need_grad)
    return loss, _or_empty(grad, zs)


@distill_loss.register_fake
def _(zs, zt, valid, kind, beta, temperature, reduction, chunk, need_grad):
    loss = zs.new_empty((zs.shape[0],) if reduction == "none" else (), dtype=F32)
    return loss, zs.new_empty(zs.shape if need_grad else 0)


def _logits_distill_setup(ctx, inputs, output):
    ctx.reduction = inputs[6]
    ctx.save_for_backward(output[1], inputs[2])


def _logits_distill_grad(ctx, g, _grad):
    grad, valid = ctx.saved_tensors
    return (logits_distill_bwd(grad, valid, g, ctx.reduction),) + (None,) * 8


distill_loss.register_autograd(_logits_distill_grad, setup_context=_logits_distill_setup)


# -------------------------------------------------------------------------------------------- MoE
@custom_op("moeflow::moe_routing", mutates_args=())
def moe_routing(topk_idx: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> (rows ``(T, K)``, row_slot ``(T*K,)``, offsets ``(E+1,)``), all int64 (see ``MoeRouting``)."""
    return ref.moe.routing_tensors(topk_idx, num_experts)


@moe_routing.register_fake
def _(topk_idx, num_experts):
    T, K = topk_idx.shape
    long = torch.int64
    return topk_idx.new_empty((T, K), dtype=long), topk_idx.new_empty(T * K, dtype=long), \
        topk_idx.new_empty(num_experts + 1, dtype=long)


@custom_op("moeflow::moe_permute", mutates_args=())
def moe_permute(x: Tensor, rows: Tensor, row_slot: Tensor) -> Tensor:
    if _triton(x, "moe_permute"):
        return triton_op("moe_permute").permute_fwd(x.contiguous(), row_slot.contiguous(), rows.shape[1])
    return ref.moe.permute_fwd(x, row_slot, rows.shape[1])


@moe_permute.register_fake
def _(x, rows, row_slot):
    return x.new_empty((row_slot.shape[0], x.shape[1]))


@custom_op("moeflow::moe_permute_backward", mutates_args=())
def moe_permute_backward(dx_perm: Tensor, rows: Tensor) -> Tensor:
    if _triton(dx_perm, "moe_permute"):
        return triton_op("moe_permute").permute_bwd(dx_perm.contiguous(), rows.contiguous())
    return ref.moe.permute_bwd(dx_perm, rows)


@moe_permute_backward.register_fake
def _(dx_perm, rows):
    return dx_perm.new_empty((rows.shape[0], dx_perm.shape[1]))


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _permute_grad(ctx, dx_perm):
    return torch.ops.moeflow.moe_permute_backward(dx_perm, ctx.saved_tensors[0]), None, None


moe_permute.register_autograd(_permute_grad, setup_context=_permute_setup)


@custom_op("moeflow::moe_combine", mutates_args=())
def moe_combine(y_perm: Tensor, rows: Tensor, row_slot: Tensor, weight: Tensor) -> Tensor:
    if _triton(y_perm, "moe_combine"):
        return triton_op("moe_combine").combine_fwd(y_perm.contiguous(), rows.contiguous(), weight.contiguous())
    return ref.moe.combine_fwd(y_perm, rows, weight)


@moe_combine.register_fake
def _(y_perm, rows, row_slot, weight):
    return y_perm.new_empty((rows.shape[0], y_perm.shape[1]))


@custom_op("moeflow::moe_combine_backward", mutates_args=())
def moe_combine_backward(
    dout: Tensor, y_perm: Tensor, rows: Tensor, row_slot: Tensor, weight: Tensor, need_dy: bool, need_dw: bool
) -> tuple[Tensor, Tensor]:
    if _triton(y_perm, "moe_combine"):
        dy, dw = triton_op("moe_combine").combine_bwd(dout.contiguous(), y_perm.contiguous(), rows.contiguous(),
                                                      row_slot.contiguous(), weight.contiguous(), need_dy, need_dw)
    else:
        dy, dw = ref.moe.combine_bwd(dout, y_perm, rows, row_slot, weight, need_dy, need_dw)
    return _or_empty(dy, y_perm), _or_empty(dw, weight)


@moe_combine_backward.register_fake
def _(dout, y_perm, rows, row_slot, weight, need_dy, need_dw):
    return y_perm.new_empty(y_perm.shape if need_dy else 0), weight.new_empty(weight.shape if need_dw else 0)


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_grad(ctx, dout):
    need_dy, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    dy, dw = torch.ops.moeflow.moe_combine_backward(dout, *ctx.saved_tensors, need_dy, need_dw)
    return _none(dy, need_dy), None, None, _none(dw, need_dw)


moe_combine.register_autograd(_combine_grad, setup_context=_combine_setup)


@custom_op("moeflow::grouped_gemm", mutates_args=())
def grouped_gemm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Per expert segment ``x_e @ w[e].T``: x ``(R, Din)`` expert-sorted rows, w ``(E, Dout, Din)``."""
    if _triton(x, "grouped_gemm"):
        return triton_op("grouped_gemm").grouped_mm(x.contiguous(), w.contiguous(), offsets, transpose_w=True)
    return ref.moe.segment_mm(x, w, offsets).contiguous()


@grouped_gemm.register_fake
def _(x, w, offsets):
    return x.new_empty((x.shape[0], w.shape[1]))


@custom_op("moeflow::grouped_gemm_backward", mutates_args=())
def grouped_gemm_backward(
    dy: Tensor, x: Tensor, w: Tensor, offsets: Tensor, need_dx: bool, need_dw: bool
) -> tuple[Tensor, Tensor]:
    dy = dy.to(x.dtype)  # autocast may hand back an fp32 gradient
    dx = dw = None
    if _triton(x, "grouped_gemm"):
        gg, dy, x, w = triton_op("grouped_gemm"), dy.contiguous(), x.contiguous(), w.contiguous()
        if need_dx:
            dx = gg.grouped_mm(dy, w, offsets, transpose_w=False)
        if need_dw:
            dw = gg.grouped_dw(dy, x, offsets, w.dtype)
    else:
        if need_dx:
            dx = ref.moe.segment_mm(dy, w, offsets, transpose_w=False)
        if need_dw:
            dw = ref.moe.segment_dw(dy, x, offsets)
    return _or_empty(dx, x), _or_empty(dw, w)


@grouped_gemm_backward.register_fake
def _(dy, x, w, offsets, need_dx, need_dw):
    return x.new_empty(x.shape if need_dx else 0), w.new_empty(w.shape if need_dw else 0)


def _gg_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gg_grad(ctx, dy):
    need_dx, need_dw = ctx.needs_input_grad[:2]
    dx, dw = torch.ops.moeflow.grouped_gemm_backward(dy, *ctx.saved_tensors, need_dx, need_dw)
    return _none(dx, need_dx), _none(dw, need_dw), None


grouped_gemm.register_autograd(_gg_grad, setup_context=_gg_setup)


@custom_op("moeflow::grouped_swiglu_mlp", mutates_args=())
def grouped_swiglu_mlp(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, offsets: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (y, g, u): the experts' SwiGLU MLP on expert-sorted rows and its pre-activations (for the backward)."""
    if _triton(x, "grouped_swiglu_mlp"):
        gg, sw = triton_op("grouped_gemm"), triton_op("swiglu")
        x = x.contiguous()
        g = gg.grouped_mm(x, w_gate.contiguous(), offsets, transpose_w=True)
        u = gg.grouped_mm(x, w_up.contiguous(), offsets, transpose_w=True)
        return gg.grouped_mm(sw.swiglu_fwd(g, u), w_down.contiguous(), offsets, transpose_w=True), g, u
    y, g, u = ref.moe.swiglu_mlp_fwd(x, w_gate, w_up, w_down, offsets)
    return y.contiguous(), g.contiguous(), u.contiguous()


@grouped_swiglu_mlp.register_fake
def _(x, w_gate, w_up, w_down, offsets):
    R, I = x.shape[0], w_gate.shape[1]
    return x.new_empty((R, w_down.shape[1])), x.new_empty((R, I)), x.new_empty((R, I))


@custom_op("moeflow::grouped_swiglu_mlp_backward", mutates_args=())
def grouped_swiglu_mlp_backward(
    dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, offsets: Tensor, g: Tensor, u: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, d w_gate, d w_up, d w_down)."""
    if _triton(x, "grouped_swiglu_mlp"):
        gg, sw = triton_op("grouped_gemm"), triton_op("swiglu")
        dy, x = dy.to(x.dtype).contiguous(), x.contiguous()
        w_gate, w_up, w_down = w_gate.contiguous(), w_up.contiguous(), w_down.contiguous()
        da = gg.grouped_mm(dy, w_down, offsets, transpose_w=False)
        dw_down = gg.grouped_dw(dy, sw.swiglu_fwd(g, u), offsets, w_down.dtype)
        dg, du = sw.swiglu_bwd(da, g, u)
        dx = gg.grouped_mm(dg, w_gate, offsets, transpose_w=False).add_(
            gg.grouped_mm(du, w_up, offsets, transpose_w=False))
        return dx, gg.grouped_dw(dg, x, offsets, w_gate.dtype), gg.grouped_dw(du, x, offsets, w_up.dtype), dw_down
    return tuple(t.contiguous() for t in ref.moe.swiglu_mlp_bwd(dy, x, w_gate, w_up, w_down, offsets, g, u))


@grouped_swiglu_mlp_backward.register_fake
def _(dy, x, w_gate, w_up, w_down, offsets, g, u):
    return x.new_empty(x.shape), w_gate.new_empty(w_gate.shape), w_up.new_empty(w_up.shape), \
        w_down.new_empty(w_down.shape)


def _mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1], output[2])


def _mlp_grad(ctx, dy, _dg, _du):
    return (*torch.ops.moeflow.grouped_swiglu_mlp_backward(dy, *ctx.saved_tensors), None)


grouped_swiglu_mlp.register_autograd(_mlp_grad, setup_context=_mlp_setup)


# -------------------------------------------------------------------------------------------- FP8
def _fp8_scale_shape(shape, rows_per_scale: int) -> tuple[int, ...]:
    kt = -(-shape[-1] // 128)
    if rows_per_scale == 1:
        return (*shape[:-1], kt)
    return (-(-shape[0] // 128), kt)


@custom_op("moeflow::fp8_quantize_act", mutates_args=())
def fp8_quantize_act(x: Tensor) -> tuple[Tensor, Tensor]:
    if _triton(x, "fp8_quantize_act", fp8=True):
        return triton_op("fp8_quant").fp8_quantize_act(x)
    q, s = ref.fp8_quantize_act(x)
    return q.contiguous(), s.contiguous()


@fp8_quantize_act.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(_fp8_scale_shape(x.shape, 1), dtype=F32)


@custom_op("moeflow::fp8_quantize_weight", mutates_args=())
def fp8_quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    if _triton(w, "fp8_quantize_weight", fp8=True):
        return triton_op("fp8_quant").fp8_quantize_weight(w)
    q, s = ref.fp8_quantize_weight(w)
    return q.contiguous(), s.contiguous()


@fp8_quantize_weight.register_fake
def _(w):
    return w.new_empty(w.shape, dtype=torch.float8_e4m3fn), w.new_empty(_fp8_scale_shape(w.shape, 128), dtype=F32)


@custom_op("moeflow::fp8_dequantize", mutates_args=())
def fp8_dequantize(x_fp8: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    if _triton(x_fp8, "fp8_dequantize", fp8=True):
        return triton_op("fp8_quant").fp8_dequantize(x_fp8.contiguous(), scale.contiguous(), dtype)
    return ref.fp8_dequantize(x_fp8, scale, dtype).contiguous()


@fp8_dequantize.register_fake
def _(x_fp8, scale, dtype):
    return x_fp8.new_empty(x_fp8.shape, dtype=dtype)


@custom_op("moeflow::fp8_gemm", mutates_args=())
def fp8_gemm(a_fp8: Tensor, a_scale: Tensor, b_fp8: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    if _triton(a_fp8, "fp8_gemm", fp8=True):
        args = (t.contiguous() for t in (a_fp8, a_scale, b_fp8, b_scale))
        return triton_op("fp8_gemm").fp8_gemm(*args, out_dtype)
    return ref.fp8_gemm(a_fp8, a_scale, b_fp8, b_scale, out_dtype).contiguous()


@fp8_gemm.register_fake
def _(a_fp8, a_scale, b_fp8, b_scale, out_dtype):
    return a_fp8.new_empty((a_fp8.shape[0], b_fp8.shape[0]), dtype=out_dtype)


@custom_op("moeflow::fp8_linear", mutates_args=())
def fp8_linear(x2d: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (y = x W^T through FP8, and the FP8 operands -- as uint8 bits, non-differentiable -- with their
    scales, which the backward dequantises)."""
    xq, xs = torch.ops.moeflow.fp8_quantize_act(x2d)
    wq, ws = torch.ops.moeflow.fp8_quantize_weight(weight)
    y = torch.ops.moeflow.fp8_gemm(xq, xs, wq, ws, x2d.dtype)
    return y, xq.view(torch.uint8), xs, wq.view(torch.uint8), ws


@fp8_linear.register_fake
def _(x2d, weight):
    u8 = torch.uint8
    return (x2d.new_empty((x2d.shape[0], weight.shape[0])), x2d.new_empty(x2d.shape, dtype=u8),
            x2d.new_empty(_fp8_scale_shape(x2d.shape, 1), dtype=F32), weight.new_empty(weight.shape, dtype=u8),
            weight.new_empty(_fp8_scale_shape(weight.shape, 128), dtype=F32))


def _fp8_linear_setup(ctx, inputs, output):
    ctx.x_dtype, ctx.w_dtype = inputs[0].dtype, inputs[1].dtype
    ctx.mark_non_differentiable(output[2], output[4])
    ctx.save_for_backward(*output[1:])


def _fp8_linear_grad(ctx, g, *_):
    # straight-through: the gradients multiply by the dequantised FP8 operands (kernels.reference.fp8)
    xq, xs, wq, ws = ctx.saved_tensors
    e4m3, dt = torch.float8_e4m3fn, ctx.x_dtype
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = g.to(dt) @ torch.ops.moeflow.fp8_dequantize(wq.view(e4m3), ws, dt)
    if ctx.needs_input_grad[1]:
        dw = (g.T.to(dt) @ torch.ops.moeflow.fp8_dequantize(xq.view(e4m3), xs, dt)).to(ctx.w_dtype)
    return dx, dw


fp8_linear.register_autograd(_fp8_linear_grad, setup_context=_fp8_linear_setup)

OPS = (
    rms_norm, swiglu, apply_rope, fused_linear_cross_entropy, fused_linear_distill_loss, distill_loss, moe_routing,
    moe_permute, grouped_gemm, grouped_swiglu_mlp, moe_combine, fp8_quantize_act, fp8_quantize_weight,
    fp8_dequantize, fp8_gemm, fp8_linear,
)
"""The forward ops (each ``*_backward`` op is reached through its forward op's autograd formula)."""
