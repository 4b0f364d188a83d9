"""Model benchmark on CPU: moeflow's model against transformers' DeepseekV3, same config, weights, dtype.

    python -m bench.model [--reps N] [--threads 2,1] [--no-compile] [--out bench/results/model_cpu.md]

Measures, in one run and interleaved (ours, theirs, ours, theirs ...; the best repetition counts):
  1. one MoE layer, forward + backward, on a (8, 256, 256) activation;
  2. a full training step (forward + backward + AdamW) on 8 x 256 tokens, with MFU against a GEMM peak
     measured in the same run (fp32 ``torch.mm`` of 2048^2 matrices); eager, and with ``compile: true``
     (inductor; ``--no-compile`` skips it);
  3. greedy decoding throughput (prefill + new tokens, 8 sequences, a short and an RL-rollout-sized
     length), eager and with ``generate(..., compile=True)`` (the first, compiling call untimed), and the
     KV-cache bytes per token each side actually holds.
The transformers model is loaded with ``from_pretrained`` from our ``export_hf`` directory, so both hold
the same weights; its logits are checked against ours before timing.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from components.model import ModelConfig, Transformer, export_hf, generate, model_info
from components.model.attention import LatentCache
from components.model.compile import compile_model

CONFIG = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=448, moe_intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
    first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=1024, mtp_depth=0,
)
BATCH, SEQ = 8, 256
DECODE_BATCH = 8
DECODE_LENGTHS = [(32, 64), (128, 384)]  # (prompt, new tokens): a short answer; an RL-rollout-sized one


def _best(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each fn ``warmup`` times, then ``reps`` rounds interleaved; seconds per call, per fn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def gemm_peak(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 GEMM throughput (FLOP/s) of torch.mm on this machine, now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build(tmp: Path):
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**CONFIG))
    export_hf(ours, tmp / "export")
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp / "export", dtype=torch.float32)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 64))
    with torch.no_grad():
        diff = (ours.eval()(ids) - theirs.eval()(ids).logits).abs().max().item()
    assert diff < 1e-4, f"models disagree before timing (max |logit diff| {diff})"
    return ours, theirs, diff


def bench_moe(ours, theirs, reps: int) -> dict[str, float]:
    x = torch.randn(BATCH, SEQ, CONFIG["hidden_size"])
    dy = torch.randn_like(x)
    moe_ours, moe_theirs = ours.layers[1].mlp, theirs.model.layers[1].mlp
    moe_ours.train()
    moe_theirs.train()

    def run_ours():
        xi = x.clone().requires_grad_()
        y, _ = moe_ours(xi)
        y.backward(dy)

    def run_theirs():
        xi = x.clone().requires_grad_()
        moe_theirs(xi).backward(dy)

    def run_loop():
        moe_ours.impl = "loop"
        try:
            run_ours()
        finally:
            moe_ours.impl = "kernel"

    def run_theirs_eager():  # transformers' per-expert loop (``experts_implementation="eager"``)
        impl = theirs.config._experts_implementation
        theirs.config._experts_implementation = "eager"
        try:
            run_theirs()
        finally:
            theirs.config._experts_implementation = impl

    fns = {"ours": run_ours, "theirs": run_theirs, "ours_loop": run_loop, "theirs_eager": run_theirs_eager}
    t = _best(fns, reps)
    moe_ours.expert_counts.zero_()
    return {k: min(v) for k, v in t.items()}


def bench_train(ours, theirs, reps: int, compiled: bool = True) -> dict[str, float]:
    """Training steps, interleaved: ours eager, transformers, and (``compiled``) a copy of ours with
    ``compile: true`` (``components.model.compile``, inductor; its compilation is the warm-up step)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], dim=1)  # ours: already shifted
    ours.train()
    theirs.train()
    for m in (ours, theirs):  # the MoE-layer benchmark's backward passes left gradients on the layer
        m.zero_grad(set_to_none=True)
    ours.reset_expert_counts()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    losses = {}

    def step_ours():
        loss = ours.compute_loss(ids, labels).loss
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        ours.update_expert_bias()
        losses["ours"] = loss.item()

    def step_theirs():
        loss = theirs(ids, labels=ids).loss
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        losses["theirs"] = loss.item()

    fns = {"ours": step_ours, "theirs": step_theirs}
    if compiled:
        twin = compile_model(copy.deepcopy(ours), backend="inductor")
        opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-4)

        def step_compiled():
            loss = twin.compute_loss(ids, labels).loss
            loss.backward()
            opt_twin.step()
            opt_twin.zero_grad(set_to_none=True)
            twin.update_expert_bias()
            losses["ours_compiled"] = loss.item()

        fns["ours_compiled"] = step_compiled
    t = _best(fns, reps)
    return {**{k: min(v) for k, v in t.items()}, **{f"loss_{k}": v for k, v in losses.items()}}


def bench_decode(ours, theirs, reps: int, prompt_len: int, new_tokens: int, compiled: bool = True) -> dict:
    ours.eval()
    theirs.eval()
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, CONFIG["vocab_size"], (DECODE_BATCH, prompt_len), generator=g)
    out: dict[str, object] = {}

    def run_ours(n=new_tokens, compile=False):
        res = generate(ours, prompts.tolist(), max_new_tokens=n, temperature=0, eos_token_id=(), compile=compile)
        out["ours_compiled" if compile else "ours"] = [r.tokens for r in res]

    def run_ours_compiled():
        run_ours(compile=True)

    def run_theirs(n=new_tokens):
        with torch.no_grad():
            gen = theirs.generate(
                prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=n,
                min_new_tokens=n, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
            )
        out["theirs"] = gen.sequences[:, prompt_len:].tolist()
        out["hf_cache"] = gen.past_key_values

    run_ours(4)  # warm up on a few tokens: the full lengths run only in the timed repetitions
    run_theirs(4)
    fns = {"ours": run_ours, "theirs": run_theirs}
    compile_s = None
    if compiled:  # compile outside the timing: the graph for this batch size and rounded cache length
        compile_s = _timed(lambda: run_ours(new_tokens, compile=True))
        fns["ours_compiled"] = run_ours_compiled
    t = _best(fns, reps, warmup=0)
    n_tok = DECODE_BATCH * new_tokens

    def agree(a: str, b: str) -> float:
        same = sum(x == y for ra, rb in zip(out[a], out[b], strict=True) for x, y in zip(ra, rb, strict=True))
        return same / n_tok

    hf_bytes = _hf_cache_bytes_per_token(out["hf_cache"], DECODE_BATCH)
    ours_bytes = LatentCache.allocate(ours.cfg, 1, 1, dtype=torch.float32, device="cpu").nbytes_per_token()
    return {
        **{f"{k}_tok_s": n_tok / min(v) for k, v in t.items()},
        "ours_bytes": ours_bytes, "theirs_bytes": hf_bytes, "agree": agree("ours", "theirs"),
        **({"agree_compiled": agree("ours_compiled", "ours"), "compile_s": compile_s} if compiled else {}),
        "prompt": prompt_len, "new": new_tokens,
    }


def _hf_cache_bytes_per_token(cache, batch: int) -> float:
    """Bytes per token per sequence actually held by transformers' cache object after generate."""
    total, seq = 0, 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
        seq = layer.keys.shape[-2]
    return total / (batch * seq)


def run(tmp: Path, reps: int, compiled: bool = True) -> tuple[dict[str, dict], object, float]:
    """Every measurement at the current thread count, on freshly built (identical) models: decoding first,
    while both still hold the exported weights, then the MoE layer, then training steps."""
    ours, theirs, diff = build(tmp)
    peak = gemm_peak()
    dec = [bench_decode(ours, theirs, max(1, reps // 2) if n > 100 else max(2, reps // 2), p, n, compiled)
           for p, n in DECODE_LENGTHS]
    moe = bench_moe(ours, theirs, reps)
    train = bench_train(ours, theirs, reps, compiled)
    peak = max(peak, gemm_peak())  # the best seen before and after the model timings
    flops_step = model_info(ours.cfg, seq_len=SEQ)["flops_per_token"] * BATCH * SEQ
    mfu = {k: flops_step / train[k] / peak for k in ("ours", "theirs", "ours_compiled") if k in train}
    result = {"peak": peak, "moe": moe, "train": train, "dec": dec, "mfu": mfu, "flops_step": flops_step}
    return result, (ours, theirs), diff


def table(r: dict, threads: int) -> list[str]:
    moe, train, decs, mfu = r["moe"], r["train"], r["dec"], r["mfu"]
    dec = decs[0]
    return [
        f"### {threads} thread{'s' if threads > 1 else ''}",
        "",
        "| benchmark | moeflow | transformers | moeflow faster / smaller by | goal |",
        "|---|---|---|---|---|",
        f"| MoE layer fwd+bwd ({BATCH}x{SEQ} tokens) | {moe['ours'] * 1e3:.1f} ms | {moe['theirs'] * 1e3:.1f} ms | "
        f"**{moe['theirs'] / moe['ours']:.2f}x** | >= 3x |",
        f"| ... against transformers' per-expert loop (`eager`) | {moe['ours'] * 1e3:.1f} ms | "
        f"{moe['theirs_eager'] * 1e3:.1f} ms | {moe['theirs_eager'] / moe['ours']:.2f}x | |",
        f"| training step (fwd+bwd+AdamW) | {train['ours'] * 1e3:.0f} ms | {train['theirs'] * 1e3:.0f} ms | "
        f"**{train['theirs'] / train['ours']:.2f}x** | >= 1.5x |",
        f"| MFU of the training step | {mfu['ours'] * 100:.1f}% | {mfu['theirs'] * 100:.1f}% | | |",
        *([f"| training step, `compile: true` (inductor) | {train['ours_compiled'] * 1e3:.0f} ms | "
           f"{train['theirs'] * 1e3:.0f} ms | **{train['theirs'] / train['ours_compiled']:.2f}x** | >= 1.5x |",
           f"| MFU of the compiled training step | {mfu['ours_compiled'] * 100:.1f}% | | | >= 65% |"]
          if "ours_compiled" in train else []),
        *[
            f"| greedy decoding, {DECODE_BATCH} x ({d['prompt']} prompt + {d['new']} new) | "
            f"{d['ours_tok_s']:.0f} tok/s | {d['theirs_tok_s']:.0f} tok/s | "
            f"**{d['ours_tok_s'] / d['theirs_tok_s']:.2f}x** | >= 2x |"
            for d in decs
        ],
        *[
            f"| greedy decoding, `compile=True` (inductor, static cache), {DECODE_BATCH} x ({d['prompt']} + "
            f"{d['new']}) | {d['ours_compiled_tok_s']:.0f} tok/s | {d['theirs_tok_s']:.0f} tok/s | "
            f"**{d['ours_compiled_tok_s'] / d['theirs_tok_s']:.2f}x** | >= 2x |"
            for d in decs if "ours_compiled_tok_s" in d
        ],
        f"| KV cache per token (fp32) | {dec['ours_bytes']:.0f} B | {dec['theirs_bytes']:.0f} B | "
        f"**{dec['theirs_bytes'] / dec['ours_bytes']:.2f}x** | >= 4x |",
        "",
        f"GEMM peak {r['peak'] / 1e9:.1f} GFLOP/s (fp32 `torch.mm` 2048^2, best in this run); per-expert loop "
        f"for the same MoE layer {moe['ours_loop'] * 1e3:.1f} ms; losses of the timed steps {train['loss_ours']:.4f} "
        f"(moeflow) / {train['loss_theirs']:.4f} (transformers)"
        + (f" / {train['loss_ours_compiled']:.4f} (moeflow compiled)" if "loss_ours_compiled" in train else "")
        + "; greedy tokens equal to transformers' (fp32 "
        "near-ties may flip a token, after which the sequences differ) "
        + ", ".join(f"{d['agree'] * 100:.0f}%" for d in decs)
        + "".join(f"; compiled decoding: tokens equal to eager {d['agree_compiled'] * 100:.0f}%, first call "
                  f"(compiles) {d['compile_s']:.0f} s" for d in decs if "agree_compiled" in d) + ".",
        "",
    ]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", default=str(torch.get_num_threads()),
                    help="comma-separated intra-op thread counts to run at (default: torch's)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the compiled training step and decoding (inductor)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "model_cpu.md")
    args = ap.parse_args(argv)
    import transformers

    load = os.getloadavg()[0]
    threads = [int(t) for t in args.threads.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in threads:
            torch.set_num_threads(n)
            results[n], (ours, theirs), diff = run(Path(tmp) / f"t{n}", args.reps, not args.no_compile)
            print("\n".join(table(results[n], n)), flush=True)
    cfg = ours.cfg
    ours_bytes = results[threads[0]]["dec"][0]["ours_bytes"]
    naive_bytes = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    lines = [
        "# moeflow model vs transformers DeepseekV3 (CPU)",
        "",
        f"`python -m bench.model --reps {args.reps} --threads {args.threads}`: torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {os.cpu_count()} CPUs ({platform.machine()}), load average "
        f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at the end. Best of {args.reps} interleaved repetitions "
        f"(decoding: of {max(2, args.reps // 2)}, the long one of {max(1, args.reps // 2)}); fp32 on both "
        f"sides; the same weights, rebuilt for each thread count (transformers loads our export; max |logit "
        f"difference| before timing {diff:.1e}).",
        "",
        "Config: " + ", ".join(f"{k}={v}" for k, v in CONFIG.items()) + f"; batch {BATCH} x {SEQ} tokens. "
        f"transformers' experts implementation: `{theirs.config._experts_implementation}` (what "
        "`from_pretrained` picks in this version).",
        "",
    ]
    for n in threads:
        lines += table(results[n], n)
    lines += [
        "Notes",
        "",
        f"- MFU = `model_info` FLOPs per step ({results[threads[0]]['flops_step'] / 1e9:.1f} GFLOP: 6 x active "
        "matmul parameters + causal attention, per token) / step time / GEMM peak.",
        f"- KV cache: both sides cache MLA's compressed latent, {latent} values (kv_lora_rank + "
        f"qk_rope_head_dim) per token per layer: transformers {transformers.__version__} already stores the "
        "latent (and re-expands it through kv_b_proj at every step), so the >= 4x goal cannot be met against "
        f"it. Against per-head keys and values (transformers 4.x DeepseekV3, most MHA/GQA caches: L x H x "
        f"(Dqk + Dv) = {naive_bytes} B/token) the latent cache is {naive_bytes / ours_bytes:.1f}x "
        "smaller.",
        "- Decoding: moeflow attends in the absorbed form against the latent cache (two small GEMMs per layer "
        "and step); transformers re-expands every cached position to per-head keys and values each step, a "
        "cost that grows with the context. Eager, a step of this model is mostly the routed experts: "
        "`grouped_mm` on CPU runs a GEMM per expert (empty ones included) over a row or two each. "
        "`generate(..., compile=True)` runs every step after the prefill as one inductor graph on a static "
        "cache (`CausalLM.decode_step`): the kernels trace their torch references, which inductor fuses, "
        "and the routed experts of a decode-sized batch run as one GEMV per (token, slot) with the gather of "
        "the expert's rows fused into it (`kernels.reference.moe.ffn_gathered`). Prefill stays eager; "
        "transformers' `generate` is eager.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return args.out


if __name__ == "__main__":
    main()
