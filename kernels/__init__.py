"""moeflow kernels: Triton kernels with one torch reference each, behind one dispatch layer.

Every public function below is differentiable and accepts fp32 and bf16. Each asserts its preconditions
with a message and calls a ``torch.library`` custom op (``torch.ops.moeflow.*``, defined in
``kernels.ops``) that picks its backend inside with ``kernels.backend.resolve`` (Triton on CUDA, the
torch reference elsewhere; ``set_backend`` / ``MOEFLOW_KERNEL_BACKEND`` force either), so
``torch.compile(fullgraph=True)`` traces through every op without a graph break. Triton itself is
imported only when the Triton backend is used, so ``TRITON_INTERPRET`` may be set any time before that.

Calls that record no gradient on the torch reference backend (decoding, evaluation, rollouts) run the
reference directly instead of the custom op (``_direct``): eager, the same functions, hence the same bits,
without the op's Python dispatch, which costs more than the op itself on decode-sized tensors; under
``torch.compile``, plain torch ops that inductor fuses (``generate(..., compile=True)``).

Ops: ``rms_norm``, ``swiglu``, ``apply_rope`` (+ ``rope_cos_sin``), ``fused_linear_cross_entropy``,
``fused_linear_distill_loss``, ``distill_loss``, ``moe_ffn`` (+ ``moe_routing``, ``moe_permute``,
``grouped_gemm``, ``grouped_swiglu_mlp``, ``moe_combine``), FP8 ``fp8_quantize_act``,
``fp8_quantize_weight``, ``fp8_dequantize``, ``fp8_gemm``, ``fp8_linear``.
"""

from __future__ import annotations

import torch

from . import ops as _ops  # noqa: F401  (registers torch.ops.moeflow.*)
from . import reference as ref
from .backend import BackendUnavailableError, get_backend, reference_without_lookup, resolve, set_backend
from .reference import MoeRouting, rope_cos_sin, rope_inv_freq

_op = torch.ops.moeflow

__all__ = [
    "BackendUnavailableError",
    "MoeRouting",
    "apply_rope",
    "distill_loss",
    "fp8_dequantize",
    "fp8_gemm",
    "fp8_linear",
    "fp8_quantize_act",
    "fp8_quantize_weight",
    "fused_linear_cross_entropy",
    "fused_linear_distill_loss",
    "get_backend",
    "grouped_gemm",
    "grouped_swiglu_mlp",
    "moe_combine",
    "moe_ffn",
    "moe_permute",
    "moe_routing",
    "rms_norm",
    "rope_cos_sin",
    "rope_inv_freq",
    "set_backend",
    "swiglu",
]

_FLOAT = (torch.float32, torch.bfloat16)


def _check_float(name: str, t: torch.Tensor) -> None:
    assert t.dtype in _FLOAT, f"{name} must be fp32 or bf16, got {t.dtype}"


def _needs_grad(t: torch.Tensor) -> bool:
    """Whether a gradient for t can be asked for (the fused losses then compute it during the forward)."""
    return torch.is_grad_enabled() and t.requires_grad


def _direct(op: str, *ts: torch.Tensor | None) -> bool:
    """Whether to call the torch reference itself rather than the custom op: with no gradient to record and
    no autocast, when the reference is the backend for ``op``.

    Eager, the custom op adds ~40-60 us of Python dispatch a call (measured on CPU, 1 thread: ``rms_norm``
    of 8 x 256 values 90 us through the op against 28 us directly), more than the op itself while
    decoding; the op's torch branch calls the same reference, so the results are the same bits. Under
    ``torch.compile`` the reference's plain torch ops are what inductor can fuse with their neighbours,
    where the op is an opaque call (a compiled decoding step: ``generate(..., compile=True)``). With a
    gradient to record, the op runs (its backward formula). Autocast would reach the reference's inner ops
    but not the custom op, hence it keeps the op.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts):
        return False
    device = ts[0].device
    if torch.is_autocast_enabled(device.type):
        return False
    if torch.compiler.is_compiling():
        return reference_without_lookup(device)
    return resolve(device, op) == "torch"


def _same_device(*named: tuple[str, torch.Tensor]) -> torch.device:
    dev = named[0][1].device
    for name, t in named[1:]:
        assert t.device == dev, f"{name} is on {t.device} but {named[0][0]} is on {dev}"
    return dev


# ---------------------------------------------------------------------------------------------- norms
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, optionally of ``x + residual``.

    x ``(..., D)`` fp32/bf16; weight ``(D,)`` fp32/bf16; residual of x's shape or None.
    Returns y in x.dtype (fp32 statistics, HF DeepseekV3RMSNorm rounding), or ``(y, x + residual)``.
    When x and residual differ in dtype (under autocast: a bf16 block output added to an fp32 residual
    stream) both are promoted first, as ``x + residual`` would be, and y comes in the promoted dtype.
    """
    _check_float("x", x)
    _check_float("weight", weight)
    assert weight.shape == (x.shape[-1],), f"weight must be ({x.shape[-1]},), got {tuple(weight.shape)}"
    if residual is not None:
        assert residual.shape == x.shape, f"residual must match x {tuple(x.shape)}, got {tuple(residual.shape)}"
        _check_float("residual", residual)
        if residual.dtype != x.dtype:
            dtype = torch.promote_types(x.dtype, residual.dtype)
            x, residual = x.to(dtype), residual.to(dtype)
    _same_device(("x", x), ("weight", weight), *([("residual", residual)] if residual is not None else []))
    if _direct("rms_norm", x, weight, residual):
        return ref.rms_norm(x, weight, eps, residual)
    y, s = _op.rms_norm(x, weight, eps, residual)
    return y if residual is None else (y, s)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; gate, up same shape and dtype (fp32/bf16), result in that dtype."""
    _check_float("gate", gate)
    assert gate.shape == up.shape and gate.dtype == up.dtype, (
        f"gate and up must match, got {tuple(gate.shape)} {gate.dtype} vs {tuple(up.shape)} {up.dtype}"
    )
    _same_device(("gate", gate), ("up", up))
    if _direct("swiglu", gate, up):
        return ref.swiglu(gate, up)
    return _op.swiglu(gate, up)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on adjacent pairs (DeepSeek's interleaved layout; see ``kernels.reference.rope``).

    x ``(..., T, D)`` fp32/bf16, D even; cos, sin ``(T, D // 2)`` fp32 (from ``rope_cos_sin``).
    """
    _check_float("x", x)
    assert x.dim() >= 2 and x.shape[-1] % 2 == 0, f"x must be (..., T, D) with D even, got {tuple(x.shape)}"
    T, D = x.shape[-2], x.shape[-1]
    for name, t in (("cos", cos), ("sin", sin)):
        assert t.shape == (T, D // 2), f"{name} must be ({T}, {D // 2}), got {tuple(t.shape)}"
        assert t.dtype == torch.float32, f"{name} must be fp32, got {t.dtype}"
    _same_device(("x", x), ("cos", cos), ("sin", sin))
    if _direct("apply_rope", x, cos, sin):
        return ref.apply_rope(x, cos, sin)
    return _op.apply_rope(x, cos, sin)


# --------------------------------------------------------------------------------------------- losses
def fused_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    reduction: str = "mean",
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``h @ weight.T / temperature`` without ever holding the N x V logits.

    h ``(N, d)`` fp32/bf16; weight ``(V, d)`` same dtype; targets ``(N,)`` int64.
    ``loss_t = lse - z_target + z_loss * lse**2``; reduction ``mean`` (over non-ignored tokens; 0 if
    none), ``sum`` or ``none`` (``(N,)`` fp32, 0 at ignored tokens; ``-loss`` are the token log-probs).
    Gradients flow to h and weight.
    """
    _check_float("h", h)
    ref.cross_entropy.check_ce_args(h, weight, targets, reduction, temperature)
    _same_device(("h", h), ("weight", weight), ("targets", targets))
    chunk = ref.chunked.check_chunked_args(h, weight, targets != ignore_index, reduction, chunk_size)
    need_dh, need_dw = _needs_grad(h), _needs_grad(weight)
    return _op.fused_linear_cross_entropy(h, weight, targets, ignore_index, float(z_loss), reduction,
                                          float(temperature), chunk, need_dh, need_dw)[0]


def fused_linear_distill_loss(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    h_t: torch.Tensor,
    w_t: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distillation loss between student ``h_s @ w_s.T`` and teacher ``h_t @ w_t.T``, chunked over tokens.

    h_s ``(N, ds)``, w_s ``(V, ds)`` fp32/bf16; h_t ``(N, dt)``, w_t ``(V, dt)`` (no gradient);
    mask ``(N,)`` bool or None. kind ``forward_kl`` | ``reverse_kl`` | ``jsd`` (generalised, TRL/Liger
    convention: beta=0 -> forward KL, beta=1 -> reverse KL). Reduction mean over masked-in tokens | sum
    | none. See ``kernels.reference.distill``.
    """
    _check_float("h_s", h_s)
    _check_float("h_t", h_t)
    _same_device(("h_s", h_s), ("w_s", w_s), ("h_t", h_t), ("w_t", w_t))
    ref.distill.check_distill_args(h_s, w_s, h_t, w_t, mask, kind, beta, temperature)
    valid = torch.ones(h_s.shape[0], dtype=torch.bool, device=h_s.device) if mask is None else mask.bool()
    chunk = ref.chunked.check_chunked_args(h_s, w_s, valid, reduction, chunk_size)
    return _op.fused_linear_distill_loss(h_s, w_s, h_t.detach(), w_t.detach(), valid, kind, float(beta),
                                         float(temperature), reduction, chunk, _needs_grad(h_s), _needs_grad(w_s))[0]


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The distillation losses of ``fused_linear_distill_loss`` on given logits ``(N, V)`` fp32/bf16."""
    _check_float("student_logits", student_logits)
    _same_device(("student_logits", student_logits), ("teacher_logits", teacher_logits))
    valid, chunk = ref.distill.check_logits_distill_args(student_logits, teacher_logits, mask, kind, beta,
                                                         temperature, reduction, chunk_size)
    return _op.distill_loss(student_logits, teacher_logits.detach(), valid, kind, float(beta), float(temperature),
                            reduction, chunk, _needs_grad(student_logits))[0]


# ------------------------------------------------------------------------------------------------ MoE
def moe_routing(topk_idx: torch.Tensor, num_experts: int) -> MoeRouting:
    """Sort the (token, slot) pairs of topk_idx ``(T, K)`` by expert (token order within an expert).

    -> ``MoeRouting``: ``T*K`` rows, no padding; expert e owns rows ``offsets[e]:offsets[e+1]``.
    """
    assert topk_idx.dim() == 2, f"topk_idx must be (T, K), got {tuple(topk_idx.shape)}"
    assert not topk_idx.is_floating_point(), f"topk_idx must be integer, got {topk_idx.dtype}"
    return MoeRouting(*_op.moe_routing(topk_idx, num_experts))


def _check_routing(routing: MoeRouting, T: int | None = None) -> None:
    assert isinstance(routing, MoeRouting), f"routing must be a MoeRouting (from moe_routing), got {type(routing)}"
    if T is not None:
        assert routing.rows.shape[0] == T, f"routing is for {routing.rows.shape[0]} tokens, x has {T}"


def moe_permute(x: torch.Tensor, routing: MoeRouting) -> torch.Tensor:
    """x ``(T, D)`` -> ``(T*K, D)``: each token copied to its K expert-sorted rows."""
    _check_float("x", x)
    assert x.dim() == 2, f"x must be (T, D), got {tuple(x.shape)}"
    _check_routing(routing, x.shape[0])
    return _op.moe_permute(x, routing.rows, routing.row_slot)


def _check_grouped(x: torch.Tensor, w: torch.Tensor, routing: MoeRouting, name: str) -> None:
    assert x.dim() == 2 and x.shape[0] == routing.num_rows, (
        f"x must be (routing.num_rows={routing.num_rows}, Din), got {tuple(x.shape)}"
    )
    assert w.dim() == 3 and w.shape[0] == routing.num_experts and w.shape[2] == x.shape[1], (
        f"{name} must be (E={routing.num_experts}, Dout, Din={x.shape[1]}), got {tuple(w.shape)}"
    )
    assert w.dtype == x.dtype, f"{name} and x dtypes differ: {w.dtype} vs {x.dtype}"
    _same_device(("x", x), (name, w))


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, routing: MoeRouting) -> torch.Tensor:
    """``y[rows of expert e] = x[rows of e] @ w[e].T``; x ``(R, Din)``, w ``(E, Dout, Din)`` -> ``(R, Dout)``.

    Exactly the routed rows are multiplied (R = T*K), each by its own expert's weight; no copies.
    """
    _check_float("x", x)
    _check_routing(routing)
    _check_grouped(x, w, routing, "w")
    return _op.grouped_gemm(x, w, routing.offsets)


def grouped_swiglu_mlp(
    x_perm: torch.Tensor, routing: MoeRouting, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Experts' SwiGLU MLP on permuted rows: x_perm ``(R, D)``; w_gate, w_up ``(E, I, D)``; w_down ``(E, D, I)``."""
    _check_float("x_perm", x_perm)
    _check_routing(routing)
    _check_grouped(x_perm, w_gate, routing, "w_gate")
    assert w_up.shape == w_gate.shape and w_up.dtype == x_perm.dtype, f"w_up must be {tuple(w_gate.shape)}"
    E, I, D = w_gate.shape
    assert w_down.shape == (E, D, I) and w_down.dtype == x_perm.dtype, f"w_down must be {(E, D, I)}"
    return _op.grouped_swiglu_mlp(x_perm, w_gate, w_up, w_down, routing.offsets)[0]


def moe_combine(y_perm: torch.Tensor, routing: MoeRouting, topk_weight: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k topk_weight[t, k] y_perm[routing.rows[t, k]]`` (fp32 sum in slot order:
    deterministic); y_perm ``(R, D)``, topk_weight ``(T, K)`` fp32 or y's dtype -> ``(T, D)`` in y's dtype."""
    _check_float("y_perm", y_perm)
    _check_routing(routing)
    assert y_perm.dim() == 2 and y_perm.shape[0] == routing.num_rows, (
        f"y_perm must be (routing.num_rows={routing.num_rows}, D), got {tuple(y_perm.shape)}"
    )
    assert topk_weight.shape == routing.rows.shape, (
        f"topk_weight must be {tuple(routing.rows.shape)}, got {tuple(topk_weight.shape)}"
    )
    return _op.moe_combine(y_perm, routing.rows, routing.row_slot, topk_weight)


def moe_ffn(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Routed experts: ``out[t] = sum_k topk_weight[t, k] expert_{topk_idx[t, k]}(x[t])`` (SwiGLU experts).

    x ``(T, D)`` fp32/bf16; topk_idx ``(T, K)`` int64; topk_weight ``(T, K)`` fp32 or x.dtype; w_gate, w_up
    ``(E, I, D)``, w_down ``(E, D, I)`` in x.dtype -> ``(T, D)`` in x.dtype. Routing, permute, the
    grouped SwiGLU MLP over exactly the routed rows, and the weighted combine: four custom ops, no padding.
    Under autocast, x and the expert weights are cast to the autocast dtype first (as its GEMMs would be).
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_gate, w_up, w_down = (t.to(dtype) for t in (x, w_gate, w_up, w_down))
    _check_float("x", x)
    assert x.dim() == 2, f"x must be (T, D), got {tuple(x.shape)}"
    T, D = x.shape
    assert topk_idx.dim() == 2 and topk_idx.shape[0] == T, f"topk_idx must be ({T}, K), got {tuple(topk_idx.shape)}"
    assert topk_idx.dtype == torch.long, f"topk_idx must be int64, got {topk_idx.dtype}"
    assert topk_weight.shape == topk_idx.shape, f"topk_weight must be {tuple(topk_idx.shape)}"
    assert topk_weight.dtype in (torch.float32, x.dtype), f"topk_weight must be fp32 or {x.dtype}"
    assert w_gate.dim() == 3 and w_gate.shape[2] == D, f"w_gate must be (E, I, {D}), got {tuple(w_gate.shape)}"
    E, I, _ = w_gate.shape
    assert w_up.shape == (E, I, D), f"w_up must be {(E, I, D)}, got {tuple(w_up.shape)}"
    assert w_down.shape == (E, D, I), f"w_down must be {(E, D, I)}, got {tuple(w_down.shape)}"
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        assert w.dtype == x.dtype, f"{name} must be {x.dtype}, got {w.dtype}"
    _same_device(("x", x), ("topk_idx", topk_idx), ("topk_weight", topk_weight), ("w_gate", w_gate),
                 ("w_up", w_up), ("w_down", w_down))
    if _direct("moe_ffn", x, topk_weight, w_gate, w_up, w_down):
        if not torch.compiler.is_compiling():
            return ref.moe.ffn_fwd(x, topk_idx, topk_weight, w_gate, w_up, w_down)
        if ref.moe.gathered_pays(T, topk_idx.shape[1], w_gate):  # decode-sized batches
            return ref.moe.ffn_gathered(x, topk_idx, topk_weight, w_gate, w_up, w_down)
        return ref.moe.ffn_fwd(x, topk_idx, topk_weight, w_gate, w_up, w_down, _op.grouped_swiglu_mlp)
    routing = moe_routing(topk_idx, E)
    y_perm = _op.grouped_swiglu_mlp(_op.moe_permute(x, routing.rows, routing.row_slot), w_gate, w_up, w_down,
                                    routing.offsets)[0]
    return _op.moe_combine(y_perm, routing.rows, routing.row_slot, topk_weight)


# ------------------------------------------------------------------------------------------------ FP8
def fp8_quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``(..., K)`` fp32/bf16 -> (float8_e4m3fn ``(..., K)``, fp32 scales ``(..., ceil(K/128))``), 1x128 tiles."""
    _check_float("x", x)
    return _op.fp8_quantize_act(x)


def fp8_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w ``(N, K)`` fp32/bf16 -> (float8_e4m3fn ``(N, K)``, fp32 scale_inv ``(ceil(N/128), ceil(K/128))``)."""
    _check_float("w", w)
    assert w.dim() == 2, f"w must be (N, K), got {tuple(w.shape)}"
    return _op.fp8_quantize_weight(w)


def fp8_dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8_e4m3fn tensor times its 1x128-tile or 128x128-block scales (layout read from scale's shape)."""
    assert x_fp8.dtype == torch.float8_e4m3fn, f"x_fp8 must be float8_e4m3fn, got {x_fp8.dtype}"
    assert scale.dtype == torch.float32, f"scale must be fp32, got {scale.dtype}"
    return _op.fp8_dequantize(x_fp8, scale, dtype)


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``A @ B.T`` with DeepSeek-V3 block scales: a ``(M, K)`` e4m3 + ``(M, ceil(K/128))`` fp32,
    b ``(N, K)`` e4m3 + ``(ceil(N/128), ceil(K/128))`` fp32 -> ``(M, N)`` out_dtype, fp32 accumulation."""
    for name, t in (("a_fp8", a_fp8), ("b_fp8", b_fp8)):
        assert t.dtype == torch.float8_e4m3fn and t.dim() == 2, f"{name} must be 2-D float8_e4m3fn, got {t.dtype}"
    M, K = a_fp8.shape
    N = b_fp8.shape[0]
    assert b_fp8.shape[1] == K, f"a {tuple(a_fp8.shape)} and b {tuple(b_fp8.shape)} must share K"
    kt = -(-K // 128)
    assert a_scale.shape == (M, kt) and a_scale.dtype == torch.float32, f"a_scale must be ({M}, {kt}) fp32"
    assert b_scale.shape == (-(-N // 128), kt) and b_scale.dtype == torch.float32, (
        f"b_scale must be ({-(-N // 128)}, {kt}) fp32, got {tuple(b_scale.shape)}"
    )
    return _op.fp8_gemm(a_fp8, a_scale, b_fp8, b_scale, out_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` through block-scaled FP8 (quantised on the fly); x ``(..., K)``, weight ``(N, K)``.

    Differentiable; the backward uses the dequantised FP8 operands in x.dtype (straight-through).
    """
    _check_float("x", x)
    _check_float("weight", weight)
    _same_device(("x", x), ("weight", weight))
    assert weight.dim() == 2 and x.shape[-1] == weight.shape[1], (
        f"x (..., K) and weight (N, K) must share K, got {tuple(x.shape)} and {tuple(weight.shape)}"
    )
    y = _op.fp8_linear(x.reshape(-1, x.shape[-1]), weight)[0]
    return y.view(*x.shape[:-1], weight.shape[0])
