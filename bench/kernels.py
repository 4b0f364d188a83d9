"""Kernel benchmarks: time and peak memory of every op, forward / backward / both, in one run.

For each op: ``moeflow`` (the dispatched op: Triton on CUDA; on CPU it *is* the torch reference, so the row
is omitted there), ``torch eager`` (the op's one torch reference, imported from ``kernels.reference``),
``torch.compile`` (that reference compiled), op-specific baselines (naive logits + loss, a per-expert
loop, Hugging Face's MoE experts) and Liger-Kernel where it is installed (CUDA only).

Peak memory is the extra memory a pass needs above what existed before it (its outputs and saved
tensors included): on CUDA ``max_memory_allocated``; on CPU the process's peak RSS, reset through
``/proc/self/clear_refs`` before each measurement.

Run: ``python -m bench.kernels [--device cuda] [--quick] [--no-compile]``; writes
``bench/results/kernels_<device>.md`` and ``.csv``. Timings are ratios taken in one run; absolute
numbers depend on the machine (and on its other tenants).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from kernels import reference as ref

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------ measuring
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _fixed_mmap_threshold() -> None:
    """Make glibc serve every allocation >= 128 KiB by mmap and return it on free (a fixed threshold
    disables glibc's adaptive one), so the resident set follows live memory and peak RSS measures a pass."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def cpu_peak_supported() -> bool:
    _fixed_mmap_threshold()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_kb("VmHWM")
        return True
    except OSError:
        return False


def peak_extra_mb(fn: Callable[[], object], device: str) -> float:
    """Extra memory (MiB) at the peak of ``fn()`` over what was allocated before; its result is kept
    alive until the measurement ends (outputs and autograd graphs count)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        keep = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _proc_kb("VmRSS") * 1024
        keep = fn()
        peak = _proc_kb("VmHWM") * 1024 - base
    del keep
    return max(peak, 0) / 2**20


def time_ms(fn: Callable[[], object], device: str, reps: int, setup: Callable[[], object] | None = None) -> float:
    """Median wall time of ``fn`` (ms) over ``reps`` runs after one warm-up; ``setup()``'s result is
    passed to fn and not timed (e.g. the forward before a timed backward)."""
    samples = []
    for i in range(reps + 1):
        arg = setup() if setup else None
        _sync(device)
        t0 = time.perf_counter()
        fn(arg) if setup else fn()
        _sync(device)
        if i:
            samples.append((time.perf_counter() - t0) * 1e3)
        del arg
    return statistics.median(samples)


# -------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One op at one size: ``make()`` builds fresh inputs; each impl maps inputs -> output tensor(s)."""

    op: str
    shape: str
    make: Callable[[], list[torch.Tensor]]
    impls: dict[str, Callable[..., object]]
    backward: bool = True
    notes: list[str] = field(default_factory=list)


def _outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def _grads_for(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]


def measure(case: Case, name: str, impl, device: str, reps: int, memory: bool) -> dict:
    inputs = case.make()
    row = {"op": case.op, "shape": case.shape, "impl": name}
    try:
        row["fwd_ms"] = time_ms(lambda: impl(*inputs), device, reps)
        if case.backward:
            def fwd():
                outs = _outputs(impl(*inputs))
                return outs, _grads_for(outs)

            def bwd(state):
                outs, grads = state
                torch.autograd.backward(outs, grads)

            def both():
                bwd(fwd())

            for t in inputs:
                t.grad = None
            row["bwd_ms"] = time_ms(bwd, device, reps, setup=fwd)
            row["fwd_bwd_ms"] = time_ms(both, device, reps)
        if memory:
            for t in inputs:
                t.grad = None
            row["fwd_peak_mb"] = peak_extra_mb(lambda: impl(*inputs), device)
            if case.backward:
                for t in inputs:
                    t.grad = None

                def fwd_bwd_keep():
                    outs = _outputs(impl(*inputs))
                    torch.autograd.backward(outs, _grads_for(outs))
                    return [t.grad for t in inputs]

                row["fwd_bwd_peak_mb"] = peak_extra_mb(fwd_bwd_keep, device)
    except Exception as exc:  # a baseline that cannot run here (e.g. compile unsupported) is reported
        row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:90]}"
    gc.collect()
    return row


def _leaf(*shape, device, dtype, scale=1.0, grad=True) -> torch.Tensor:
    return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


def _compiled(fn):
    from components.model.compile import isolate_inductor_cache

    isolate_inductor_cache()
    return torch.compile(fn, dynamic=False)


def _liger(name: str):
    try:
        import liger_kernel.transformers.functional as lf  # noqa: F401
        from liger_kernel import ops  # noqa: F401
    except Exception:
        return None
    try:
        if name == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama")
        if name == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply
        if name == "fused_ce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss = LigerFusedLinearCrossEntropyLoss()
            return lambda h, w, t: loss(w, h, t)
    except Exception:
        return None
    return None


def build_cases(device: str, quick: bool, compile_ref: bool) -> list[Case]:
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    on_gpu = device == "cuda"
    s = 4 if quick else 1
    cases: list[Case] = []

    def add(op, shape, make, impls, liger=None, backward=True):
        impls = dict(impls)
        eager = impls["torch eager"]
        if compile_ref:
            impls["torch.compile"] = _compiled(eager)
        if on_gpu:
            impls = {"moeflow (triton)": impls.pop("moeflow"), **impls}
            if liger is not None:
                impls["liger"] = liger
        else:
            impls.pop("moeflow")  # on CPU the dispatched op is the eager reference itself
        cases.append(Case(op, shape, make, impls, backward))

    # RMSNorm (+ residual)
    M, D = (16384 if on_gpu else 4096) // s, 4096 if on_gpu else 1024
    add("rms_norm+residual", f"{M}x{D} {str(dt)[6:]}",
        lambda: [_leaf(M, D, device=device, dtype=dt), _leaf(D, device=device, dtype=dt),
                 _leaf(M, D, device=device, dtype=dt)],
        {"moeflow": lambda x, w, r: kernels.rms_norm(x, w, 1e-6, r),
         "torch eager": lambda x, w, r: ref.rms_norm(x, w, 1e-6, r)})
    add("rms_norm", f"{M}x{D} {str(dt)[6:]}",
        lambda: [_leaf(M, D, device=device, dtype=dt), _leaf(D, device=device, dtype=dt)],
        {"moeflow": lambda x, w: kernels.rms_norm(x, w, 1e-6), "torch eager": lambda x, w: ref.rms_norm(x, w, 1e-6)},
        liger=_liger("rms_norm") if on_gpu else None)
    # SwiGLU
    M, I = (16384 if on_gpu else 4096) // s, 4096 if on_gpu else 2048
    add("swiglu", f"{M}x{I} {str(dt)[6:]}",
        lambda: [_leaf(M, I, device=device, dtype=dt), _leaf(M, I, device=device, dtype=dt)],
        {"moeflow": kernels.swiglu, "torch eager": ref.swiglu}, liger=_liger("swiglu") if on_gpu else None)
    # RoPE on the decoupled rope part (B, H, T, dr)
    B, H, T, Dr = (8 if on_gpu else 2) // min(s, 2), 128 if on_gpu else 16, 4096 if on_gpu else 1024, 64
    cos, sin = ref.rope_cos_sin(torch.arange(T, device=device), Dr, 10000.0)
    add("rope (interleaved)", f"{B}x{H}x{T}x{Dr} {str(dt)[6:]}",
        lambda: [_leaf(B, H, T, Dr, device=device, dtype=dt)],
        {"moeflow": lambda x: kernels.apply_rope(x, cos, sin), "torch eager": lambda x: ref.apply_rope(x, cos, sin)})
    # Fused linear + cross-entropy (timing size)
    N, d, V = (8192 if on_gpu else 1024) // s, 4096 if on_gpu else 512, 128256 if on_gpu else 32768

    def ce_make(N=N, d=d, V=V):
        return [_leaf(N, d, device=device, dtype=dt), _leaf(V, d, device=device, dtype=dt, scale=d**-0.5),
                torch.randint(0, V, (N,), device=device)]

    def naive_ce(h, w, t):
        return F.cross_entropy((h @ w.T).float(), t)

    add("fused_linear_cross_entropy", f"{N}x{d}x{V} {str(dt)[6:]}", ce_make,
        {"moeflow": kernels.fused_linear_cross_entropy, "torch eager": ref.fused_linear_cross_entropy,
         "naive logits + F.cross_entropy": naive_ce}, liger=_liger("fused_ce") if on_gpu else None)
    # Fused distillation (forward KL)
    Nd = N // 2

    def kd_make():
        return [_leaf(Nd, d, device=device, dtype=dt), _leaf(V, d, device=device, dtype=dt, scale=d**-0.5),
                _leaf(Nd, d, device=device, dtype=dt, grad=False),
                _leaf(V, d, device=device, dtype=dt, scale=d**-0.5, grad=False)]

    def naive_kd(hs, ws, ht, wt):
        return F.kl_div(torch.log_softmax((hs @ ws.T).float(), -1), torch.log_softmax((ht @ wt.T).float(), -1),
                        reduction="batchmean", log_target=True)

    add("fused_linear_distill (fwd KL)", f"{Nd}x{d}x{V} {str(dt)[6:]}", kd_make,
        {"moeflow": kernels.fused_linear_distill_loss, "torch eager": ref.fused_linear_distill_loss,
         "naive logits + F.kl_div": naive_kd})
    # MoE routed experts
    Tm, Dm, E, K, Im = (8192 if on_gpu else 2048) // s, 2048 if on_gpu else 256, 64, 8 if on_gpu else 6, \
        1408 if on_gpu else 64

    def moe_make():
        idx = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(Tm)])
        return [_leaf(Tm, Dm, device=device, dtype=dt), idx,
                torch.softmax(torch.randn(Tm, K, device=device), -1).requires_grad_(),
                _leaf(E, Im, Dm, device=device, dtype=dt, scale=Dm**-0.5),
                _leaf(E, Im, Dm, device=device, dtype=dt, scale=Dm**-0.5),
                _leaf(E, Dm, Im, device=device, dtype=dt, scale=Im**-0.5)]

    def hf_experts():
        """transformers' DeepseekV3Experts (a loop over the hit experts), with the same weights."""
        try:
            from transformers import DeepseekV3Config
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts
        except Exception:
            return None
        cfg = DeepseekV3Config(hidden_size=Dm, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=Im)
        mod = DeepseekV3Experts(cfg).to(device=device, dtype=dt)

        def run(x, idx, w, wg, wu, wd):
            # the module's own parameters hold the same values; autograd reaches them, not wg/wu/wd
            with torch.no_grad():
                mod.gate_up_proj.copy_(torch.cat([wg, wu], 1))
                mod.down_proj.copy_(wd)
            return mod(x, idx, w.to(dt))

        return run

    moe_impls = {"moeflow": kernels.moe_ffn, "torch eager": ref.moe_ffn, "per-expert loop": ref.moe_ffn_loop}
    hf = hf_experts()
    if hf is not None:
        moe_impls["HF DeepseekV3Experts"] = hf
    add("moe_ffn (routed experts)", f"T{Tm} D{Dm} E{E} K{K} I{Im} {str(dt)[6:]}", moe_make, moe_impls)
    # FP8 (forward only: quantise + block-scaled GEMM; fp8_linear fwd+bwd)
    Mf = (4096 if on_gpu else 1024) // s

    def fp8_make():
        return [_leaf(Mf, Mf, device=device, dtype=dt), _leaf(Mf, Mf, device=device, dtype=dt, scale=Mf**-0.5)]

    add("fp8_linear (quantise + GEMM)", f"{Mf}^3 {str(dt)[6:]}", fp8_make,
        {"moeflow": kernels.fp8_linear, "torch eager": ref.fp8_linear,
         f"{str(dt)[6:]} matmul (unquantised)": lambda x, w: x @ w.T})
    return cases


# ------------------------------------------------------------------------------------------- headline
def fused_ce_memory(device: str, N: int, d: int, V: int) -> dict:
    """Peak extra memory of fused linear CE vs naive logits + F.cross_entropy, forward + backward."""
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    h = _leaf(N, d, device=device, dtype=dt)
    w = _leaf(V, d, device=device, dtype=dt, scale=d**-0.5)
    t = torch.randint(0, V, (N,), device=device)

    def run(loss_fn):
        def go():
            h.grad = w.grad = None
            loss_fn(h, w, t).backward()
            return h.grad, w.grad

        return go

    fused = peak_extra_mb(run(lambda h, w, t: kernels.fused_linear_cross_entropy(h, w, t)), device)
    h.grad = w.grad = None
    naive = peak_extra_mb(run(lambda h, w, t: F.cross_entropy((h @ w.T).float(), t)), device)
    return {"shape": f"{N}x{d}x{V} {str(dt)[6:]}", "fused_mb": fused, "naive_mb": naive, "ratio": fused / naive}


def single_thread_cpu_ms(fns: dict[str, Callable[[], object]], reps: int = 3) -> dict[str, float]:
    """Best-of-``reps`` process CPU time (ms) of each ``fn`` (forward + backward) on one thread: on a
    shared, oversubscribed machine wall time mostly measures the neighbours, CPU time on one thread far less."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, fn in fns.items():
            fn()
            best = math.inf
            for _ in range(reps):
                t0 = time.process_time()
                fn()
                best = min(best, time.process_time() - t0)
            out[name] = best * 1e3
        return out
    finally:
        torch.set_num_threads(threads)


def moe_cpu_time_line(case: Case) -> str:
    inputs = case.make()

    def fwd_bwd(impl):
        def go():
            out = impl(*inputs)
            out.backward(torch.ones_like(out))

        return go

    names = ["torch eager", "per-expert loop"] + [n for n in case.impls if n.startswith("HF")]
    ms = single_thread_cpu_ms({n: fwd_bwd(case.impls[n]) for n in names})
    base = ms["torch eager"]
    parts = [f"{n} {v:.0f} ms" + ("" if n == "torch eager" else f" ({v / base:.2f}x)") for n, v in ms.items()]
    return f"MoE routed experts ({case.shape}), forward + backward, single-thread CPU time: " + ", ".join(parts) + "."


# ---------------------------------------------------------------------------------------------- report
COLUMNS = ["op", "shape", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_peak_mb", "fwd_bwd_peak_mb", "error"]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_results(rows: list[dict], headline: dict | None, extra: dict[str, str], device: str, argv: list[str],
                  merge: bool) -> Path:
    """Render ``kernels_<device>.md``/``.csv`` from ``kernels_<device>.json``. With ``merge`` (an ``--ops``
    run) the ops just measured replace their old rows and everything else is kept, each row tagged with
    the run that measured it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    state_path = RESULTS / f"kernels_{device}.json"
    state = {"runs": [], "rows": [], "headline": None, "extra": {}}
    if merge and state_path.exists():
        state = json.loads(state_path.read_text())
    dev_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    load = "" if device == "cuda" else f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end"
    state["runs"].append(f"`python -m bench.kernels {' '.join(argv)}` ({time.strftime('%Y-%m-%d %H:%M')}) on "
                         f"{dev_name}, torch {torch.__version__}, {torch.get_num_threads()} threads{load}")
    run = len(state["runs"])
    new_ops = {r["op"] for r in rows}
    state["rows"] = [r for r in state["rows"] if r["op"] not in new_ops] + [{**r, "run": run} for r in rows]
    state["headline"] = {**headline, "run": run} if headline else state["headline"]
    state["extra"].update({k: {"text": v, "run": run} for k, v in extra.items()})
    _drop_unused_runs(state)
    state_path.write_text(json.dumps(state, indent=1))
    return render(state, device)


def _drop_unused_runs(state: dict) -> None:
    """Forget runs whose every row was re-measured since, and renumber the rest."""
    items = state["rows"] + list(state["extra"].values()) + ([state["headline"]] if state["headline"] else [])
    used = sorted({it["run"] for it in items})
    renum = {old: new for new, old in enumerate(used, 1)}
    state["runs"] = [state["runs"][old - 1] for old in used]
    for it in items:
        it["run"] = renum[it["run"]]


def render(state: dict, device: str) -> Path:
    """Write ``kernels_<device>.md`` and ``.csv`` from the merged results."""
    cols = COLUMNS + ["run"]
    with open(RESULTS / f"kernels_{device}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=cols)
        wr.writeheader()
        for r in state["rows"]:
            wr.writerow({k: r.get(k, "") for k in cols})
    md = [f"# Kernel benchmarks ({device})", "", "Runs:", ""]
    md += [f"{i}. {desc}" for i, desc in enumerate(state["runs"], 1)]
    md += ["", "Medians; peak = extra memory above the inputs during the pass, outputs and saved tensors "
           f"included ({'max_memory_allocated' if device == 'cuda' else 'peak RSS via /proc/self/clear_refs'}). "
           "Timings are comparable only within one op and one run.", ""]
    h = state["headline"]
    if h:
        md += ["## Fused linear + cross-entropy: peak memory, forward + backward", "",
               "| shape | fused (MiB) | naive logits + F.cross_entropy (MiB) | fused / naive | goal | run |",
               "|---|---|---|---|---|---|",
               f"| {h['shape']} | {h['fused_mb']:.0f} | {h['naive_mb']:.0f} | {h['ratio']:.1%} | {h['goal']} | "
               f"{h['run']} |", ""]
    for e in state["extra"].values():
        md += [f"{e['text']} (run {e['run']})", ""]
    md += ["## Per op", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in state["rows"]:
        md.append("| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |")
    md_path = RESULTS / f"kernels_{device}.md"
    md_path.write_text("\n".join(md) + "\n")
    return md_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ops", default="", help="comma-separated substrings of op names to run (default all)")
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    device = args.device
    torch.manual_seed(0)
    memory = device == "cuda" or cpu_peak_supported()
    headline = None
    if not args.ops or "cross_entropy" in args.ops:
        N, d, V = (8192, 512, 32768) if device == "cpu" else (8192, 4096, 128256)
        if args.quick:
            N = N // 8
        if memory:
            headline = fused_ce_memory(device, N, d, V)
            headline["goal"] = "<= 25%" if device == "cpu" else "<= 20%"
            print(f"fused linear CE peak memory {headline['shape']}: {headline['fused_mb']:.0f} MiB vs naive "
                  f"{headline['naive_mb']:.0f} MiB = {headline['ratio']:.1%}", flush=True)
    rows = []
    extra: dict[str, str] = {}
    for case in build_cases(device, args.quick, not args.no_compile):
        if args.ops and not any(o in case.op for o in args.ops.split(",")):
            continue
        for name, impl in case.impls.items():
            row = measure(case, name, impl, device, args.reps, memory)
            rows.append(row)
            print(" | ".join(_fmt(row.get(k)) for k in COLUMNS), flush=True)
        if case.op.startswith("moe_ffn"):
            by = {r["impl"]: r for r in rows if r["op"] == case.op and "fwd_bwd_ms" in r}
            base = by.get("moeflow (triton)", by.get("torch eager"))
            loop = by.get("per-expert loop")
            if base and loop:
                extra[case.op] = (f"MoE routed experts ({case.shape}), forward + backward: {base['impl']} "
                                  f"{base['fwd_bwd_ms']:.1f} ms vs per-expert loop {loop['fwd_bwd_ms']:.1f} ms = "
                                  f"{loop['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x faster (wall time, 2 threads).")
            if device == "cpu":
                extra[case.op + " cpu time"] = moe_cpu_time_line(case)
                print(extra[case.op + " cpu time"], flush=True)
    path = write_results(rows, headline, extra, device, argv, merge=bool(args.ops))
    print(f"wrote {path} and {path.with_suffix('.csv')}")
    if not math.isfinite(headline["ratio"] if headline else 0.0):
        raise SystemExit("fused CE memory measurement failed")


if __name__ == "__main__":
    main()
