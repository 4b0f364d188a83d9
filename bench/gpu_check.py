"""GPU check: hardware peaks, then moeflow's kernels against the issue's GPU goals, in one table.

Run by ``bench/gpu_check.sh`` on an NVIDIA GPU (written for an H200; FP8 rows need sm_89+). Measures:
copy bandwidth (device-to-device ``copy_``), dense bf16 and FP8 GEMM peaks (cuBLAS ``matmul`` and
``torch._scaled_mm`` at 8192^3), then the goals:

- RMSNorm forward reaches >= 80% of the measured copy bandwidth (bytes read + written / time);
- fused linear cross-entropy peak memory <= 20% of naive ``logits = h @ W.T; F.cross_entropy`` at vocab 128k;
- the block-scaled FP8 GEMM reaches >= 50% of the measured FP8 peak at 4096^3;
- the MoE grouped GEMM is >= 3x faster than a per-expert loop at 64 experts, top-8;
and reports the MoE layer with every token on one expert (the unpadded layout: no cost for the 63 idle
experts) and the ``compile: true`` training step (inductor) against eager, with its loss difference, and
``generate(..., compile=True)`` against eager decoding.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import kernels
from kernels import reference as ref

from .kernels import fused_ce_memory


def bench_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median CUDA-event time of ``fn()`` in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs() -> float:
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() / ms / 1e6


def gemm_tflops(fn, m: int, n: int, k: int) -> float:
    return 2 * m * n * k / bench_ms(fn) / 1e9


def bf16_peak(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return gemm_tflops(lambda: a @ b, n, n, n)


def fp8_peak(n: int = 8192) -> float | None:
    if torch.cuda.get_device_capability() < (8, 9) or not hasattr(torch, "_scaled_mm"):
        return None
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    return gemm_tflops(lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True),
                       n, n, n)


def rms_norm_bandwidth(M: int = 32768, D: int = 4096) -> float:
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ms = bench_ms(lambda: kernels.rms_norm(x, w, 1e-6))
    return (2 * x.numel() * x.element_size()) / ms / 1e6  # read x, write y


def fp8_gemm_tflops(n: int = 4096) -> float:
    (aq, asc) = kernels.fp8_quantize_act(torch.randn(n, n, device="cuda", dtype=torch.bfloat16))
    (bq, bsc) = kernels.fp8_quantize_weight(torch.randn(n, n, device="cuda", dtype=torch.bfloat16))
    return gemm_tflops(lambda: kernels.fp8_gemm(aq, asc, bq, bsc), n, n, n)


def moe_grouped_vs_loop(T: int = 8192, D: int = 2048, I: int = 1408, E: int = 64, K: int = 8) -> tuple[float, float]:
    """(grouped GEMM ms, per-expert loop ms) for the gate projection of T tokens routed top-K over E."""
    idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, I, D, device="cuda", dtype=torch.bfloat16) * D**-0.5
    routing = kernels.moe_routing(idx, E)  # exactly the T*K routed rows, no padding
    xp = kernels.moe_permute(x, routing)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    x_sorted = x[order // K]
    counts = torch.bincount(flat, minlength=E).tolist()

    def loop():
        outs, s = [], 0
        for e, c in enumerate(counts):
            outs.append(F.linear(x_sorted[s : s + c], w[e]))
            s += c
        return torch.cat(outs)

    with torch.no_grad():
        return bench_ms(lambda: kernels.grouped_gemm(xp, w, routing)), bench_ms(loop)


def moe_ffn_vs_loop(T: int = 4096, D: int = 2048, I: int = 1408, E: int = 64, K: int = 8) -> tuple[float, float]:
    """(moeflow moe_ffn ms, per-expert loop ms), forward + backward."""
    idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    tw = torch.softmax(torch.randn(T, K, device="cuda"), -1).requires_grad_()
    ws = [(torch.randn(E, a, b, device="cuda", dtype=torch.bfloat16) * b**-0.5).requires_grad_()
          for a, b in ((I, D), (I, D), (D, I))]
    g = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        return lambda: fn(x, idx, tw, *ws).backward(g)

    return bench_ms(run(kernels.moe_ffn), reps=5), bench_ms(run(ref.moe_ffn_loop), reps=5)


def moe_ffn_one_busy_expert(T: int = 4096, D: int = 2048, I: int = 1408, E: int = 64) -> tuple[float, float]:
    """(moe_ffn ms fwd+bwd with every token on one expert (63 idle), same with a balanced top-1 router):
    without padding or weight copies the skewed router costs about the balanced one."""
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = [(torch.randn(E, a, b, device="cuda", dtype=torch.bfloat16) * b**-0.5).requires_grad_()
          for a, b in ((I, D), (I, D), (D, I))]
    tw = torch.ones(T, 1, device="cuda")
    g = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    busy = torch.zeros(T, 1, dtype=torch.long, device="cuda")
    balanced = torch.arange(T, device="cuda").remainder(E).view(T, 1)
    return tuple(bench_ms(lambda idx=idx: kernels.moe_ffn(x, idx, tw, *ws).backward(g), reps=5)
                 for idx in (busy, balanced))


def compiled_step(reps: int = 5) -> tuple[float, float, float]:
    """(eager ms, compiled ms, |loss difference|) of a training forward + backward of bench.model's config
    under bf16 autocast: ``compile: true`` (inductor, components.model.compile) against eager."""
    import copy

    from components.model import ModelConfig, Transformer
    from components.model.compile import compile_model

    from .model import BATCH, CONFIG, SEQ

    torch.manual_seed(0)
    eager = Transformer(ModelConfig(**CONFIG)).cuda().train()
    compiled = compile_model(copy.deepcopy(eager), backend="inductor")
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), device="cuda")
    labels = torch.roll(ids, -1, 1)

    def step(model):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.compute_loss(ids, labels).loss
            loss.backward()
            return loss
        return run

    diff = abs(float(step(eager)()) - float(step(compiled)()))  # also the compilation
    return bench_ms(step(eager), reps=reps), bench_ms(step(compiled), reps=reps), diff


def compiled_decoding(batch: int = 8, prompt: int = 128, new: int = 384, device: str = "cuda") -> tuple[float, ...]:
    """(eager tok/s, compiled tok/s, share of equal greedy tokens) of ``generate`` on bench.model's config
    (fp32): ``compile=True`` (one inductor graph a step on a static cache, the Triton ops inside) against
    eager; the compiling first call is not timed."""
    import time

    from components.model import ModelConfig, Transformer, generate

    from .model import CONFIG

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIG)).to(device).eval()
    prompts = torch.randint(3, CONFIG["vocab_size"], (batch, prompt)).tolist()
    out = {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(compile: bool) -> float:
        sync()
        t0 = time.perf_counter()
        res = generate(model, prompts, max_new_tokens=new, temperature=0, eos_token_id=(), compile=compile)
        sync()
        out[compile] = [r.tokens for r in res]
        return batch * new / (time.perf_counter() - t0)

    run(True)  # compiles
    eager, compiled = max(run(False) for _ in range(2)), max(run(True) for _ in range(2))
    same = sum(a == b for x, y in zip(out[True], out[False], strict=True) for a, b in zip(x, y, strict=True))
    return eager, compiled, same / (batch * new)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    assert torch.cuda.is_available(), "gpu_check needs an NVIDIA GPU"
    torch.manual_seed(0)
    kernels.set_backend("auto")
    rows: list[tuple[str, str, str, str]] = []

    def row(name, value, goal="", ok=None):
        rows.append((name, value, goal, "" if ok is None else ("PASS" if ok else "FAIL")))
        print(f"{name}: {value} {goal}", flush=True)

    bw = copy_bandwidth_gbs()
    row("copy bandwidth (GB/s)", f"{bw:.0f}")
    row("bf16 GEMM peak 8192^3 (TFLOP/s)", f"{bf16_peak():.0f}")
    f8 = fp8_peak()
    row("FP8 GEMM peak 8192^3, _scaled_mm (TFLOP/s)", "n/a (no FP8)" if f8 is None else f"{f8:.0f}")
    rn = rms_norm_bandwidth()
    row("RMSNorm fwd 32768x4096 bf16 (GB/s)", f"{rn:.0f} = {rn / bw:.0%} of copy", ">= 80%", rn / bw >= 0.8)
    ce = fused_ce_memory("cuda", 8192, 4096, 128256)
    row(f"fused linear CE peak memory {ce['shape']}", f"{ce['fused_mb']:.0f} / {ce['naive_mb']:.0f} MiB "
        f"= {ce['ratio']:.1%}", "<= 20%", ce["ratio"] <= 0.2)
    if f8 is not None:
        t = fp8_gemm_tflops()
        row("moeflow FP8 block-scaled GEMM 4096^3 (TFLOP/s)", f"{t:.0f} = {t / f8:.0%} of FP8 peak", ">= 50%",
            t / f8 >= 0.5)
    gg, loop = moe_grouped_vs_loop()
    row("MoE grouped GEMM vs per-expert loop (E64 top-8, T8192, 2048->1408)",
        f"{gg:.2f} ms vs {loop:.2f} ms = {loop / gg:.1f}x", ">= 3x", loop / gg >= 3)
    ffn, ffn_loop = moe_ffn_vs_loop()
    row("MoE moe_ffn fwd+bwd vs per-expert loop (E64 top-8, T4096)", f"{ffn:.1f} ms vs {ffn_loop:.1f} ms = "
        f"{ffn_loop / ffn:.1f}x")
    busy, balanced = moe_ffn_one_busy_expert()
    row("MoE moe_ffn fwd+bwd, all tokens on 1 of 64 experts vs balanced top-1 (T4096)",
        f"{busy:.1f} ms vs {balanced:.1f} ms = {busy / balanced:.2f}x")
    t_eager, t_comp, diff = compiled_step()
    row("training fwd+bwd, bench.model config, bf16: compiled (inductor) vs eager",
        f"{t_comp:.1f} ms vs {t_eager:.1f} ms = {t_eager / t_comp:.2f}x, |dloss| {diff:.1e}", "< 1e-2",
        diff < 1e-2)
    dec_eager, dec_comp, agree = compiled_decoding()
    row("greedy decoding 8 x (128 + 384), bench.model config, fp32: compile=True vs eager",
        f"{dec_comp:.0f} vs {dec_eager:.0f} tok/s = {dec_comp / dec_eager:.2f}x, tokens equal {agree:.0%}",
        ">= 90%", agree >= 0.9)
    w = max(len(r[0]) for r in rows)
    print("\n" + f"{'metric':<{w}} | {'measured':<32} | goal   | result")
    print("-" * (w + 55))
    for name, value, goal, ok in rows:
        print(f"{name:<{w}} | {value:<32} | {goal:<6} | {ok}")


if __name__ == "__main__":
    main()
