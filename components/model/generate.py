"""Batched sampling with the model's KV cache: what RL rollouts, distillation and evaluation call.

Any family works (``model.allocate_cache`` gives its cache): DeepSeek-V3's MLA caches the latent (R + Dr
values per token per layer; later steps run the absorbed form), the dense families' GQA caches rotated
keys and values per key/value head. Prompts are left-padded to a common length and prefilled in one
pass; every later step feeds one token per live sequence against the cache. Sequences that finish are
dropped from the batch, so the cost follows the live ones.

Sampling: logits / temperature -> top-k -> top-p (nucleus) -> one inverse-CDF draw (`draw`) from a generator seeded
with ``seed`` (same arguments + same seed = same tokens). ``temperature == 0`` is greedy. The reported
``logprobs`` are log-softmax(logits / temperature) of the chosen tokens over the FULL vocabulary (not
renormalised after top-k/top-p), i.e. what a trainer recomputes as pi_old at that temperature; for greedy
decoding they are taken at temperature 1. ``with_entropy`` also reports, per generated token, the entropy of
that same full distribution (what an RL trainer logs as the policy's entropy, here from the probabilities
the sampler computes anyway instead of a second pass over the vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .model import CausalLM

STATIC_LEN_MULTIPLE = 64  # compiled decoding: cache lengths are rounded up to this (one graph per multiple)


@dataclass
class GenerationResult:
    """One sampled continuation. ``tokens`` are the generated ids only (including the stop token, if any)."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    prompt_index: int
    sample_index: int
    stop: str | int | None = None  # the stop string or stop token id that ended it
    text: str | None = field(default=None)  # decoded tokens when a tokenizer was given
    entropies: list[float] | None = None  # per token, with ``with_entropy``: entropy of log-softmax(logits / T)


def _filter_logits(scaled_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < scaled_BV.shape[-1]:
        kth_B1 = scaled_BV.topk(top_k, dim=-1).values[:, -1:]
        scaled_BV = scaled_BV.masked_fill(scaled_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = scaled_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first stays).
        drop_BV = (probs_BV.cumsum(-1) - probs_BV) >= top_p
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        scaled_BV = torch.empty_like(scaled_BV).scatter_(-1, order_BV, sorted_BV)
    return scaled_BV


def sample_next(
    logits_BV: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> (tokens (B,) int64, logprobs (B,) fp32 at the sampling temperature over the full vocabulary, and
    with ``with_entropy`` that distribution's entropy (B,) fp32, else None)."""
    logits_BV = logits_BV.float()
    if temperature == 0:
        tok_B = logits_BV.argmax(-1)
        logp_BV = logits_BV.log_softmax(-1)
        full_BV = logp_BV.exp() if with_entropy else None
    else:
        logp_BV = (logits_BV / temperature).log_softmax(-1)
        filtered = 0 < top_k < logp_BV.shape[-1] or top_p < 1.0
        full_BV = logp_BV.exp() if with_entropy or not filtered else None
        # the filter keeps the order of the scores, so it may act on the log-probs (a shift of the logits)
        tok_B = draw(_filter_logits(logp_BV, top_k, top_p).exp() if filtered else full_BV, generator)
    entropy_B = -(full_BV * logp_BV).nan_to_num_().sum(-1) if with_entropy else None
    return tok_B, logp_BV.gather(1, tok_B[:, None]).squeeze(1), entropy_B


def draw(probs_BV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row with probability ``probs_BV[b, v]`` (rows need not sum to 1): inverse-CDF sampling.

    One uniform per row, found in the row's running sum. ``torch.multinomial(probs, 1)`` races one
    exponential draw per vocabulary entry instead (B x V random numbers), a sixth of a tiny-preset
    rollout on CPU (`bench/results/rl_step_cpu.md`: 3.2 ms against 0.16 ms per draw of 128 x 1,106).
    A zero-probability token is never drawn: the first index whose running sum exceeds ``u * total`` is
    one where the sum grew, and ``u * total`` is kept below the total.
    """
    cdf_BV = probs_BV.cumsum(-1)
    total_B1 = cdf_BV[:, -1:]
    u_B1 = torch.rand(total_B1.shape, generator=generator, dtype=cdf_BV.dtype, device=cdf_BV.device)
    x_B1 = torch.minimum(u_B1 * total_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1)))
    return torch.searchsorted(cdf_BV, x_B1, right=True).squeeze(1)


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer: Any = None,
    seed: int | None = None,
    num_samples: int = 1,
    with_entropy: bool = False,
    compile: bool = False,
) -> list[GenerationResult]:
    """Sample ``num_samples`` continuations of every prompt; results are prompt-major
    (``results[p * num_samples + s]``).

    eos_token_id: None = the model config's eos ids; ``()`` = none. A sequence stops at an eos or stop
    token, or once its decoded text contains a stop string (needs ``tokenizer`` with ``decode``), else
    after ``max_new_tokens`` (finish_reason "length").

    compile: run every step after the prefill as one ``torch.compile`` graph (``CausalLM.decode_step``
    on a static cache, its length rounded up to a multiple of ``STATIC_LEN_MULTIPLE``; see
    ``components.model.compile.compiled_decode_step``). The first call for a batch size and rounded
    length compiles (seconds); finished sequences stay in the batch, which keeps its shape, but only the
    live rows are sampled, so a seed draws what eager draws. The same tokens as eager up to fp32 rounding
    (fused kernels sum in another order, so a near-tie may flip a token).
    """
    _check_args(prompts, max_new_tokens, temperature, top_p, top_k, num_samples, stop_strings, tokenizer)
    cfg = model.cfg
    eos = cfg.eos_token_ids if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    stop_ids = set(eos) | set(stop_token_ids)
    P = max(len(p) for p in prompts)
    if P + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"longest prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
            f"({cfg.max_position_embeddings}); lower max_new_tokens or truncate the prompts"
        )
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        n_prompts = len(prompts)
        ids_BP = torch.zeros(n_prompts, P, dtype=torch.long, device=device)
        S = P + max_new_tokens
        if compile:  # one graph serves every length up to the next multiple
            S = -(-S // STATIC_LEN_MULTIPLE) * STATIC_LEN_MULTIPLE
        cache = model.allocate_cache(n_prompts, S, dtype=dtype, device=device)
        for b, p in enumerate(prompts):
            ids_BP[b, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
            cache.valid[b, P - len(p):P] = True
        logits_BV = model.forward_cached(ids_BP, cache)
        rows = torch.arange(n_prompts, device=device).repeat_interleave(num_samples)
        if num_samples > 1:
            cache, logits_BV = cache.select(rows), logits_BV[rows]
        n = n_prompts * num_samples
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        entropies: list[list[float]] = [[] for _ in range(n)]
        finish: list[tuple[str, str | int | None]] = [("length", None)] * n
        live = list(range(n))  # eager: batch row i of the cache holds sequence live[i]; compiled: row s holds s
        live_rows = None  # compiled, once a sequence has finished: live as a tensor (the rows to sample)
        step_fn = None
        if compile:
            from .compile import compiled_decode_step

            model._rope(0, cache.max_len, device)  # decode_step reads the tables; build them eagerly
            cache.pos = torch.zeros(1, dtype=torch.long, device=device)
            step_fn = compiled_decode_step(model)
        max_stop_len = max((len(s) for s in stop_strings), default=0)
        for step in range(max_new_tokens):
            if live_rows is not None:  # sample the live rows only, as eager does
                logits_BV = logits_BV.index_select(0, live_rows)
            tok_B, lp_B, ent_B = sample_next(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p,
                                             generator=generator, with_entropy=with_entropy)
            if ent_B is not None:
                for seq, e in zip(live, ent_B.tolist(), strict=True):
                    entropies[seq].append(e)
            keep = []
            for i, (t, lp) in enumerate(zip(tok_B.tolist(), lp_B.tolist(), strict=True)):
                seq = live[i]
                tokens[seq].append(t)
                logprobs[seq].append(lp)
                stop = t if t in stop_ids else None
                if stop is None and max_stop_len:
                    tail = tokenizer.decode(tokens[seq][-(max_stop_len + 4):])
                    stop = next((s for s in stop_strings if s in tail), None)
                if stop is not None:
                    finish[seq] = ("stop", stop)
                    continue
                keep.append(i)
            if not keep or step == max_new_tokens - 1:
                break
            cache.valid[:, cache.length] = True
            if step_fn is not None:  # every row runs (a fixed shape); finished ones are fed token 0, unread
                if live_rows is not None:
                    tok_B = torch.zeros(n, dtype=tok_B.dtype, device=device).index_copy_(0, live_rows, tok_B)
                if len(keep) < len(live):
                    live = [live[i] for i in keep]
                    live_rows = torch.tensor(live, device=device)
                cache.pos.fill_(cache.length)
                logits_BV = step_fn(model, tok_B[:, None], cache)
                cache.length += 1
                continue
            if len(keep) < len(live):
                idx = torch.tensor(keep, device=device)
                cache, tok_B = cache.select(idx), tok_B[idx]
                live = [live[i] for i in keep]
            logits_BV = model.forward_cached(tok_B[:, None], cache)
    finally:
        model.train(was_training)
    return [
        GenerationResult(
            tokens=tokens[s], logprobs=logprobs[s], finish_reason=finish[s][0], stop=finish[s][1],
            prompt_index=s // num_samples, sample_index=s % num_samples,
            text=None if tokenizer is None else tokenizer.decode(tokens[s]),
            entropies=entropies[s] if with_entropy else None,
        )
        for s in range(n)
    ]


def _check_args(prompts, max_new_tokens, temperature, top_p, top_k, num_samples, stop_strings, tokenizer):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (anything with .decode(list[int]) -> str)")
