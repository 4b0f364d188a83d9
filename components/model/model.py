"""The DeepSeek-V3-architecture causal LM, and ``CausalLM``: what it shares with the dense families
(``dense.py``) -- the interface every moeflow stage trains, samples and exports through.

Single-device code: data/expert/tensor parallelism, FSDP and torch.compile are applied from outside.

Shape legend: B batch, T sequence, D hidden, V vocab, N = B*T tokens, E routed experts.

Parameter names follow transformers' DeepseekV3 (``embed_tokens``, ``layers.L.self_attn.q_a_proj`` ...)
except that routed experts are stacked (``layers.L.mlp.experts.w_gate`` (E, I, D) ...); ``hf.py``
converts to and from the per-expert keys of DeepSeek's checkpoints. With tied embeddings there is no
``lm_head`` parameter at all (the head reads ``embed_tokens.weight``), so the state dict never holds two
names for one storage.

Multi-token prediction (DeepSeek-V3 section 2.2), depth k = 1..D, on the trunk's last hidden states h^0
(before the final norm):
  h^k_i = TRM_k( W_eh [ RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i) ] ),  i = 0 .. T-1-k
  logits^k_i = Head(RMSNorm_k(h^k_i)) predicts t_{i+k+1}
sharing the embedding and the output head with the main model; loss = lm + (lambda / D) sum_k CE_k.
The concatenation order [embedding ; hidden] is that of DeepSeek's checkpoints (``eh_proj``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .attention import LatentCache, MLAttention
from .config import ModelConfig
from .layers import MLP, Linear, RMSNorm
from .moe import MoE

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """What ``compute_loss`` returns. ``loss`` is the differentiable total; the parts are for logging."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    aux_loss: torch.Tensor | None
    n_tokens: torch.Tensor  # 0-dim int64: a tensor, so that a compiled compute_loss has no host sync (graph break)


class CausalLM(nn.Module):
    """What every moeflow causal LM shares: embedding -> blocks -> final norm -> output head, the RoPE
    tables, the cached forward that ``generate`` drives, and the fused next-token loss.

    A family (``MoEFlowForCausalLM`` here, ``dense.DenseForCausalLM``) builds ``cfg``, ``embed_tokens``,
    ``layers`` (each called ``block(h, cos, sin, cache, layer) -> (h, aux loss or None)``), ``norm``,
    ``lm_head`` (None when tied) and ``_rope_tables = {}``, and implements ``_rope_table`` and
    ``allocate_cache``.
    """

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) for every matrix (as transformers), ones for norms, zeros for biases."""
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)

    # --- accessors --------------------------------------------------------------------------------
    def output_weight(self) -> torch.Tensor:
        """The (V, D) output projection (the embedding matrix when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _rope(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (length, rotary dims / 2) fp32 for positions start .. start+length-1 (cached per device)."""
        end = start + length
        table = self._rope_tables.get(device)
        if table is None or table[0].shape[0] < end:
            n = max(end, 2 ** math.ceil(math.log2(max(end, 1))))
            n = max(min(n, max(self.cfg.max_position_embeddings, end)), end)
            # Built outside inference mode even when first needed by generate(): an inference tensor
            # could not be saved for backward by a later training step (RL samples, then trains).
            with torch.inference_mode(False), torch.no_grad():
                table = self._rope_table(torch.arange(n, device=device), device)
            self._rope_tables[device] = table
        return table[0][start:end], table[1][start:end]

    def _rope_table(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (len(positions), rotary dims / 2) fp32: the family's RoPE."""
        raise NotImplementedError

    def allocate_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str):
        """An empty KV cache of the family's kind for ``generate`` / ``forward_cached``."""
        raise NotImplementedError

    # --- forward ----------------------------------------------------------------------------------
    def _trunk(self, input_ids_BT: torch.Tensor, cache: Any = None):
        """-> (h_BTD before the final norm, summed aux loss or None)."""
        if input_ids_BT.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids_BT.shape)}")
        B, T = input_ids_BT.shape
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + T} positions exceeds max_position_embeddings="
                f"{self.cfg.max_position_embeddings}; shorten the input or raise max_position_embeddings"
            )
        cos, sin = self._rope(start, T, input_ids_BT.device)
        return self._blocks(self.embed_tokens(input_ids_BT), cos, sin, cache)

    def _blocks(self, h_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Any):
        aux_total = None
        for i, block in enumerate(self.layers):
            h_BTD, aux = block(h_BTD, cos, sin, cache, i)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return h_BTD, aux_total

    def hidden_states(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) hidden states after the final norm."""
        return self.norm(self._trunk(input_ids_BT)[0])

    def forward(self, input_ids_BT: torch.Tensor, labels: torch.Tensor | None = None):
        """(B, T) token ids -> (B, T, V) logits (materialised).

        With ``labels`` it returns ``compute_loss(input_ids, labels)`` instead, so that wrappers which
        hook ``forward`` (DDP, FSDP) see the training step.
        """
        if labels is not None:
            return self.compute_loss(input_ids_BT, labels)
        return F.linear(self.hidden_states(input_ids_BT), self.output_weight())

    def forward_cached(self, input_ids_BT: torch.Tensor, cache: Any, last_only: bool = True) -> torch.Tensor:
        """Run T new tokens against ``cache`` (from ``allocate_cache``; writing their keys/latents and
        advancing ``cache.length``).

        -> logits (B, V) of the last position if ``last_only`` else (B, T, V). The caller sets
        ``cache.valid`` for the new positions (True for real tokens) before the call.
        """
        h_BTD, _ = self._trunk(input_ids_BT, cache)
        cache.length += input_ids_BT.shape[1]
        if last_only:
            h_BTD = h_BTD[:, -1]
        return F.linear(self.norm(h_BTD), self.output_weight())

    def decode_step(self, input_ids_B1: torch.Tensor, cache: Any) -> torch.Tensor:
        """One new token per row at position ``cache.pos`` (a (1,) int64 tensor) -> logits (B, V).

        Static decoding: every shape follows from the cache's allocation (each attention writes at
        ``cache.pos`` and attends over the whole buffer under a mask), so ``torch.compile`` traces one graph
        for a whole generation (``generate(..., compile=True)``). The caller sets ``cache.valid`` at the
        position and advances it; the RoPE tables must already cover the buffer (``_rope(0, max_len)``).
        """
        cos_P, sin_P = self._rope_tables[input_ids_B1.device]
        cos, sin = cos_P.index_select(0, cache.pos), sin_P.index_select(0, cache.pos)
        h_B1D, _ = self._blocks(self.embed_tokens(input_ids_B1), cos, sin, cache)
        return F.linear(self.norm(h_B1D[:, -1]), self.output_weight())

    def hidden_states_cached(self, input_ids_BT: torch.Tensor, cache: Any) -> torch.Tensor:
        """``forward_cached``'s trunk for every new position: -> (B, T, D) hidden states after the final norm.

        Differentiable (the cache's writes are tracked by autograd): the RL update runs each prompt once and
        its completions against the prompt's cache this way (``components.rl.trainer``).
        """
        h_BTD, _ = self._trunk(input_ids_BT, cache)
        cache.length += input_ids_BT.shape[1]
        return self.norm(h_BTD)

    def compute_loss(self, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor) -> LossOutput:
        """Next-token loss (+ the family's extra losses) without materialising the (B, T, V) logits.

        labels[b, t] is the target of position t (already shifted; -100 = ignore). Each cross-entropy is
        the mean over its non-ignored targets (0 when there are none).
        """
        if labels_BT.shape != input_ids_BT.shape:
            raise ValueError(f"labels {tuple(labels_BT.shape)} must match input_ids {tuple(input_ids_BT.shape)}")
        h_BTD, aux = self._trunk(input_ids_BT)
        W_VD = self.output_weight()
        lm_loss = self._ce(self.norm(h_BTD), W_VD, labels_BT)
        mtp_loss, aux = self._extra_losses(input_ids_BT, labels_BT, h_BTD, W_VD, aux)
        loss = lm_loss
        if mtp_loss is not None:
            loss = loss + mtp_loss
        if aux is not None:
            loss = loss + aux
        n_tokens = (labels_BT != IGNORE_INDEX).sum()  # a tensor: no host sync in a compiled graph
        return LossOutput(loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, aux_loss=aux, n_tokens=n_tokens)

    def _extra_losses(self, input_ids_BT, labels_BT, h_BTD, W_VD, aux):
        """-> (MTP loss or None, aux loss or None) on top of the next-token loss; none by default."""
        return None, aux

    @staticmethod
    def _ce(h_BTD: torch.Tensor, W_VD: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        labels_N = labels_BT.reshape(-1)
        total = kernels.fused_linear_cross_entropy(  # weight cast as autocast would (no-op without it)
            h_BTD.reshape(-1, h_BTD.shape[-1]), W_VD.to(h_BTD.dtype), labels_N, ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return total / (labels_N != IGNORE_INDEX).sum().clamp(min=1)


class Block(nn.Module):
    """Pre-norm transformer block: MLA attention, then a dense SwiGLU MLP or a DeepSeekMoE layer."""

    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MoE | MLP = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size, fp8=cfg.fp8)

    def forward(self, x_BTD, cos, sin, cache: LatentCache | None = None, layer: int = 0):
        """-> (x_BTD, aux loss or None)."""
        attn_BTD = self.self_attn(self.input_layernorm(x_BTD), cos, sin, cache, layer)
        y_BTD, x_BTD = self.post_attention_layernorm(attn_BTD, residual=x_BTD)  # x <- x + attn
        if isinstance(self.mlp, MoE):
            out_BTD, aux = self.mlp(y_BTD)
        else:
            out_BTD, aux = self.mlp(y_BTD), None
        return x_BTD + out_BTD, aux


class SharedHead(nn.Module):
    """An MTP module's own final norm (the output projection itself is the model's shared head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(Block):
    """One multi-token-prediction depth: projection of [norm(emb) ; norm(h)] then a MoE block."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, moe=True)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, cfg.fp8)
        self.shared_head = SharedHead(cfg)

    def forward_mtp(self, h_prev_BTD, emb_BTD, cos, sin):
        x_BTD = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_prev_BTD)], dim=-1))
        return self.forward(x_BTD, cos, sin)


class MoEFlowForCausalLM(CausalLM):
    """DeepSeek-V3-architecture causal LM (MLA + DeepSeekMoE + optional MTP). See the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kernel_backend != "auto":
            kernels.set_backend(cfg.kernel_backend)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    # --- construction -----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CausalLM's initialisation, and zero balancing biases and counters."""
        super().reset_parameters()
        for moe in self.moe_layers():
            if moe.gate.e_score_correction_bias.device.type != "meta":
                moe.gate.e_score_correction_bias.zero_()
                moe.expert_counts.zero_()

    # --- accessors --------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        """The MoE layers: those of the trunk in order, then those of the MTP modules."""
        blocks = list(self.layers) + list(self.mtp)
        return [b.mlp for b in blocks if isinstance(b.mlp, MoE)]

    def set_moe_impl(self, impl: str) -> None:
        """``"kernel"`` (permute + grouped GEMM, default) or ``"loop"`` (readable per-expert loop)."""
        if impl not in ("kernel", "loop"):
            raise ValueError(f"moe impl must be 'kernel' or 'loop', got {impl!r}")
        for moe in self.moe_layers():
            moe.impl = impl

    # --- forward (the rest is CausalLM's) ---------------------------------------------------------
    def _extra_losses(self, input_ids_BT, labels_BT, h_BTD, W_VD, aux):
        """The MTP modules' losses (depth k reads input_ids[:, k:] and predicts labels[:, k:]) and their aux."""
        D_mtp, T = len(self.mtp), input_ids_BT.shape[1]
        if not D_mtp or T <= D_mtp:
            return None, aux
        mtp_losses = []
        for k, module in enumerate(self.mtp, start=1):
            Tk = T - k
            cos, sin = self._rope(0, Tk, input_ids_BT.device)
            emb_BTD = self.embed_tokens(input_ids_BT[:, k:])
            h_BTD, aux_k = module.forward_mtp(h_BTD[:, :Tk], emb_BTD, cos, sin)
            if aux_k is not None:
                aux = aux_k if aux is None else aux + aux_k
            mtp_losses.append(self._ce(module.shared_head.norm(h_BTD), W_VD, labels_BT[:, k:]))
        return self.cfg.mtp_loss_weight / D_mtp * torch.stack(mtp_losses).sum(), aux

    def _rope_table(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        return kernels.rope_cos_sin(positions, cfg.qk_rope_head_dim, cfg.rope_theta, device, cfg.rope_scaling)

    def allocate_cache(
        self, batch: int, max_len: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> LatentCache:
        return LatentCache.allocate(self.cfg, batch, max_len, dtype=dtype, device=device)

    # --- expert-load bookkeeping (aux-loss-free balancing) -----------------------------------------
    def expert_counts(self) -> torch.Tensor:
        """(n_moe_layers, E) int64 tokens routed to each expert since the last reset (training mode only).

        Rows: the trunk's MoE layers in order, then the MTP modules' MoE layers.
        """
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, self.cfg.n_routed_experts, dtype=torch.int64)
        return torch.stack([m.expert_counts for m in layers])

    @torch.no_grad()
    def update_expert_bias(self, counts: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing: per MoE layer, bias -= gamma for experts above the mean load, += gamma
        below. ``counts`` (n_moe_layers, E) overrides the local counters (pass all-reduced counts under DDP).
        Resets the counters."""
        layers = self.moe_layers()
        if counts is not None and tuple(counts.shape) != (len(layers), self.cfg.n_routed_experts):
            raise ValueError(
                f"counts must be (n_moe_layers={len(layers)}, E={self.cfg.n_routed_experts}), "
                f"got {tuple(counts.shape)}"
            )
        for i, moe in enumerate(layers):
            moe.update_bias(None if counts is None else counts[i])
        self.reset_expert_counts()

    def reset_expert_counts(self) -> None:
        for moe in self.moe_layers():
            moe.expert_counts.zero_()

    # --- arithmetic -------------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """total / active (per token) parameters of the trunk + head, and the MTP modules' own."""
        from .arithmetic import model_info

        info = model_info(self.cfg)
        return {"total": info["total_params"], "active": info["active_params"], "mtp": info["mtp_params"]}


Transformer = MoEFlowForCausalLM
DeepseekV3Model = MoEFlowForCausalLM
