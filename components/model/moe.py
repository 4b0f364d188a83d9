"""DeepSeekMoE: sigmoid router with group-limited top-K and aux-loss-free balancing, routed + shared experts.

Shape legend: B batch, T tokens (B*T when flattened), D hidden, E routed experts, K experts per token,
G expert groups, I expert width.

Routing (``noaux_tc``, DeepSeek-V3 / transformers ``DeepseekV3TopkRouter``), all in fp32:
  s = sigmoid(x W_g^T)                       affinities (T, E)
  s' = s + b                                 b = e_score_correction_bias, a buffer: selection only
  group score = sum of the top-2 s' per group; keep the best ``topk_group`` groups (others -> -inf)
  top-K of s' among the kept experts picks the experts
  weights = s of those experts (unbiased), / their sum if norm_topk_prob, * routed_scaling_factor
Output = sum_k weight_k * expert_k(x) + shared(x).

Balancing without an auxiliary loss: in training mode each MoE layer adds its per-expert token counts to
``expert_counts``; after the optimizer step the trainer calls ``update_bias`` (through the model), which
moves b_i down by gamma when expert i got more than the mean load and up by gamma when it got less.
An optional sequence-wise auxiliary loss ``alpha * sum_i f_i P_i`` is returned when alpha > 0.

Expert parallelism (``Experts.shard``, applied from outside by the trainer): each of ``ep`` ranks keeps
E/ep consecutive experts. Every rank routes its own tokens with the full (replicated) router, exactly as
one process would; the (token, expert) assignments are sorted by expert, their counts exchanged, and the
rows sent to the experts' owners with one ``all_to_all_single`` (variable splits); the owners run their
experts on what they received (``kernels.moe_ffn`` with K = 1, weight 1) and a second all-to-all returns
the outputs, which the sending rank weights and sums over its K slots. Both all-to-alls are
differentiable (``torch.distributed._functional_collectives.all_to_all_single_autograd``, traceable
by ``torch.compile``: its backward is the reverse exchange). Expert counts and the balancing bias stay
global (E entries on every rank).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import ModelConfig
from .layers import MLP


class Router(nn.Module):
    """Sigmoid affinities, group-limited top-K selection on biased scores, unbiased gate weights.

    ``weight`` (E, D) and the ``e_score_correction_bias`` (E,) buffer stay fp32 whatever dtype the model
    is cast to (as transformers' ``_keep_in_fp32_modules_strict``): routing decisions and the small
    gamma-steps of the bias need the precision.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn: Callable, recurse: bool = True):  # keep fp32 through model.to(bfloat16)
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32 and self.weight.is_floating_point():
            self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> topk_idx (T, K) int64, topk_weight (T, K) fp32, scores (T, E) fp32 (unbiased)."""
        T = x_TD.shape[0]
        with torch.autocast(x_TD.device.type, enabled=False):  # route in fp32, even under bf16 autocast
            scores_TE = F.linear(x_TD.float(), self.weight.float()).sigmoid()
        with torch.no_grad():  # selection only: the bias never reaches the gate weights or any gradient
            choice_TE = scores_TE.detach() + self.e_score_correction_bias
            if self.n_group > 1:
                choice_TGe = choice_TE.view(T, self.n_group, -1)
                group_scores_TG = choice_TGe.topk(2, dim=-1).values.sum(-1)
                group_idx_TG = group_scores_TG.topk(self.topk_group, dim=-1, sorted=False).indices
                keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, group_idx_TG, True)
                # Discarded groups are filled with -inf (transformers >= 5.12 and DeepSeek; <= 5.5 used 0.0,
                # which differs only when s + b < 0).
                choice_TE = choice_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, -1)
            topk_idx_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
        if self.norm_topk_prob:
            topk_weight_TK = topk_weight_TK / (topk_weight_TK.sum(-1, keepdim=True) + 1e-20)
        return topk_idx_TK, topk_weight_TK * self.scale, scores_TE


@dataclass
class ExpertParallel:
    """This rank's place among the ranks that share the experts: ``group`` (the EP process group),
    ``rank`` in it, ``size`` = ep; this rank holds experts [rank * E/ep, (rank + 1) * E/ep)."""

    group: object  # torch.distributed.ProcessGroup
    rank: int
    size: int


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: ``w_gate``/``w_up`` (E, I, D), ``w_down`` (E, D, I).

    ``forward`` dispatches through ``kernels.moe_ffn`` (permute by expert + grouped GEMM + weighted
    combine); ``forward_loop`` is the readable per-expert loop it must equal. After ``shard`` the
    parameters hold this rank's E/ep experts only and both go through the all-to-all exchange.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.n_experts = E
        self.w_gate = nn.Parameter(torch.empty(E, I, D))
        self.w_up = nn.Parameter(torch.empty(E, I, D))
        self.w_down = nn.Parameter(torch.empty(E, D, I))
        self.ep: ExpertParallel | None = None
        self.a2a_bytes = 0  # bytes this rank sent to other ranks in all-to-alls (forward + backward)

    @torch.no_grad()
    def shard(self, ep: ExpertParallel) -> None:
        """Keep only this rank's E/ep experts (a slice of the full, identically initialised stacks)."""
        if self.n_experts % ep.size:
            raise ValueError(f"n_routed_experts ({self.n_experts}) must be a multiple of the EP size ({ep.size})")
        if self.ep is not None:
            raise RuntimeError("experts are already sharded")
        n = self.n_experts // ep.size
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(full[ep.rank * n:(ep.rank + 1) * n].clone()))
        self.ep = ep

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        if self.ep is not None:
            return self._forward_ep(x_TD, topk_idx_TK, topk_weight_TK, kernels.moe_ffn)
        return kernels.moe_ffn(x_TD, topk_idx_TK, topk_weight_TK, self.w_gate, self.w_up, self.w_down)

    def _forward_ep(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                    local: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Dispatch each (token, expert) row to the expert's owner, run the local experts, combine back."""
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        ep = self.ep
        T, K = topk_idx_TK.shape
        D = x_TD.shape[1]
        n_local = self.w_gate.shape[0]
        if torch.is_autocast_enabled(x_TD.device.type):  # send what the experts compute in (half the bytes)
            x_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        with torch.no_grad():
            flat = topk_idx_TK.reshape(-1)
            order = torch.argsort(flat, stable=True)  # assignments grouped by expert, hence by owner
            counts_E = torch.bincount(flat, minlength=self.n_experts)
            recv_counts = torch.empty_like(counts_E)  # (source rank, local expert) counts of what arrives
            dist.all_to_all_single(recv_counts, counts_E, group=ep.group)
            send_splits = counts_E.view(ep.size, n_local).sum(1).tolist()
            recv_RL = recv_counts.view(ep.size, n_local)
            recv_splits = recv_RL.sum(1).tolist()
            local_idx = torch.repeat_interleave(
                torch.arange(n_local, device=flat.device).repeat(ep.size), recv_RL.reshape(-1)
            )
        x_send = x_TD[order // K]
        x_recv = funcol.wait_tensor(funcol.all_to_all_single_autograd(x_send, recv_splits, send_splits, ep.group))
        if x_recv.shape[0]:
            ones = torch.ones(x_recv.shape[0], 1, dtype=torch.float32, device=x_recv.device)
            y_recv = local(x_recv, local_idx[:, None], ones, self.w_gate, self.w_up, self.w_down)
        else:  # no rows for this rank's experts: still take part in both exchanges (and their backward),
            # and give the weights a zero gradient (data-parallel replicas reduce them together)
            touch = sum(w.sum() for w in (self.w_gate, self.w_up, self.w_down)).to(x_recv.dtype)
            y_recv = x_recv * 0 + touch * 0
        y_send = funcol.wait_tensor(funcol.all_to_all_single_autograd(y_recv, send_splits, recv_splits, ep.group))
        y_TKD = y_send[torch.argsort(order)].view(T, K, D)  # back to (token, slot) order
        out_TD = (y_TKD.float() * topk_weight_TK[..., None].float()).sum(1)
        off_rank = (sum(send_splits) - send_splits[ep.rank]) * D * x_send.element_size() + (
            sum(recv_splits) - recv_splits[ep.rank]) * D * y_recv.element_size()
        self.a2a_bytes += off_rank * (2 if torch.is_grad_enabled() and x_send.requires_grad else 1)
        return out_TD.to(x_TD.dtype)

    def forward_loop(
        self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor
    ) -> torch.Tensor:
        if self.ep is not None:
            return self._forward_ep(x_TD, topk_idx_TK, topk_weight_TK, _expert_loop)
        return _expert_loop(x_TD, topk_idx_TK, topk_weight_TK, self.w_gate, self.w_up, self.w_down)


def _expert_loop(x_TD, topk_idx_TK, topk_weight_TK, w_gate, w_up, w_down) -> torch.Tensor:
    """The readable per-expert loop ``kernels.moe_ffn`` must equal (same arguments)."""
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(w_gate.shape[0]):
        tok, slot = torch.where(topk_idx_TK == e)  # tokens routed to expert e, and in which slot
        if tok.numel() == 0:
            continue
        x_nD = x_TD[tok]
        h_nI = F.silu(F.linear(x_nD, w_gate[e])) * F.linear(x_nD, w_up[e])
        y_nD = F.linear(h_nI, w_down[e])
        out_TD = out_TD.index_add(0, tok, y_nD.float() * topk_weight_TK[tok, slot, None].float())
    return out_TD.to(x_TD.dtype)


class MoE(nn.Module):
    """Routed experts + shared experts, with expert-load bookkeeping and the optional sequence aux loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gamma, self.alpha = cfg.bias_update_speed, cfg.seq_aux_loss_weight
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, fp8=cfg.fp8)
            if cfg.n_shared_experts > 0
            else None
        )
        # Tokens per expert since the last reset (training mode only); not part of the state dict.
        self.register_buffer("expert_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False)
        self.impl: Literal["kernel", "loop"] = "kernel"

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) -> (y (B, T, D), sequence-wise aux loss or None)."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        topk_idx_TK, topk_weight_TK, scores_TE = self.gate(x_TD)
        experts = self.experts.forward_loop if self.impl == "loop" else self.experts
        y_TD = experts(x_TD, topk_idx_TK, topk_weight_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        aux = None
        if self.training:
            with torch.no_grad():
                idx_N = topk_idx_TK.flatten()  # scatter_add keeps a static shape (bincount breaks compiled graphs)
                self.expert_counts.scatter_add_(0, idx_N, torch.ones_like(idx_N))
            if self.alpha > 0:
                aux = self._seq_aux_loss(topk_idx_TK.view(B, T, -1), scores_TE.view(B, T, -1))
        return y_TD.view(B, T, D), aux

    def _seq_aux_loss(self, topk_idx_BTK: torch.Tensor, scores_BTE: torch.Tensor) -> torch.Tensor:
        """``alpha * sum_i f_i P_i`` per sequence, averaged over sequences (DeepSeek-V3 eq. 17-20).

        f_i = E / (K T) * #tokens of the sequence routed to i;  P_i = mean_t s_{i,t} / sum_j s_{j,t}.
        """
        B, T, K = topk_idx_BTK.shape
        E = self.n_experts
        with torch.no_grad():
            hits_BE = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
                1, topk_idx_BTK.view(B, -1), torch.ones(B, T * K, device=scores_BTE.device)
            )
            f_BE = hits_BE * (E / (K * T))
        p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
        return self.alpha * (f_BE * p_BE).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing step: b_i -= gamma if load_i > mean load, += gamma if below."""
        load = (self.expert_counts if counts_E is None else counts_E).to(torch.float64)
        step = torch.sign(load.mean() - load).to(torch.float32)
        self.gate.e_score_correction_bias.add_(self.gamma * step.to(self.gate.e_score_correction_bias.device))
