"""The routed experts at decode-sized batches, compiled: gathered GEMVs against the grouped GEMMs (CPU).

    python -m bench.moe_decode [--threads 1,2] [--reps 20] [--out bench/results/moe_decode_cpu.md]

``generate(..., compile=True)`` traces ``kernels.moe_ffn`` with no gradient; for small batches it runs
``kernels.reference.moe.ffn_gathered`` (one GEMV per routed row, the expert-row gather fused in by
inductor), else the grouped SwiGLU op (``grouped_mm``, a GEMM per expert on CPU). This times both forms,
each compiled with inductor, on the bench model's experts and the tiny preset's, over batch sizes, in one
run and interleaved (three layers' weights in turn, so that one layer's weights are not all cached), and
shows which one ``kernels.reference.moe.gathered_pays`` picks. The rule should pick the faster form
except near the crossover.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from components.model.compile import isolate_inductor_cache
from kernels import ops  # noqa: F401  (registers torch.ops.moeflow.*)
from kernels.reference import moe as ref_moe

CONFIGS = {  # name: (E, I, D, K)
    "bench model (64 experts, 3 x 64 x 256, top-6)": (64, 64, 256, 6),
    "tiny preset (16 experts, 3 x 64 x 128, top-2)": (16, 64, 128, 2),
}
TOKENS = (1, 8, 32, 64, 128, 256)
LAYERS = 3


def _grouped(x, idx, wt, wg, wu, wd):
    return ref_moe.ffn_fwd(x, idx, wt, wg, wu, wd, torch.ops.moeflow.grouped_swiglu_mlp)


def measure(E: int, I: int, D: int, K: int, T: int, reps: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(T)
    ws = [(torch.randn(E, I, D, generator=g) / D**0.5, torch.randn(E, I, D, generator=g) / D**0.5,
           torch.randn(E, D, I, generator=g) / I**0.5) for _ in range(LAYERS)]
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    wt = torch.rand(T, K, generator=g)
    fns = {"grouped": torch.compile(_grouped, dynamic=False, fullgraph=True),
           "gathered": torch.compile(ref_moe.ffn_gathered, dynamic=False, fullgraph=True)}
    times = {k: [] for k in fns}
    with torch.inference_mode():
        outs = {k: f(x, idx, wt, *ws[0]) for k, f in fns.items()}  # compiles
        diff = (outs["grouped"] - outs["gathered"]).abs().max().item()
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for w in ws:
                    f(x, idx, wt, *w)
                times[k].append((time.perf_counter() - t0) / LAYERS)
    torch._dynamo.reset()
    return {**{k: sorted(v)[len(v) // 2] for k, v in times.items()}, "diff": diff}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe_decode_cpu.md")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    isolate_inductor_cache()
    load = os.getloadavg()[0]
    lines = [
        "# Routed experts at decode sizes, compiled: gathered GEMVs vs grouped GEMMs (CPU)",
        "",
        f"`python -m bench.moe_decode --threads {args.threads} --reps {args.reps}`: torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), load average {load:.1f} at start. Median of {args.reps} "
        f"interleaved repetitions, each over {LAYERS} layers' weights in turn; both forms compiled with "
        "inductor, no gradient (what `generate(..., compile=True)` runs).",
        "",
    ]
    for n in threads:
        torch.set_num_threads(n)
        for name, (E, I, D, K) in CONFIGS.items():
            lines += [f"### {name}, {n} thread{'s' if n > 1 else ''}", "",
                      "| tokens | routed rows per expert | grouped (us/layer) | gathered (us/layer) "
                      "| gathered faster by | `gathered_pays` picks | max abs diff |", "|---|---|---|---|---|---|---|"]
            w_gate = torch.empty(E, I, D)
            for T in TOKENS:
                r = measure(E, I, D, K, T, args.reps)
                pick = "gathered" if ref_moe.gathered_pays(T, K, w_gate) else "grouped"
                lines.append(f"| {T} | {T * K / E:.2f} | {r['grouped'] * 1e6:.0f} | {r['gathered'] * 1e6:.0f} | "
                             f"{r['grouped'] / r['gathered']:.2f}x | {pick} | {r['diff']:.1e} |")
                print(lines[-1], flush=True)
            lines.append("")
    lines.append(f"Load average at the end {os.getloadavg()[0]:.1f}.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return args.out


if __name__ == "__main__":
    main()
