"""The science benchmark: the tiny pipeline over several seeds and over the CPU code paths this machine can
emulate, so that the README's numbers, the preset and the end-to-end thresholds rest on a distribution,
never on one run of one CPU.

    python -m bench.science                                   # 3 seeds x 5 CPU variants x 2 recipes
    python -m bench.science --seeds 0 --variants default      # one run (~11 minutes on 2 idle cores)
    python -m bench.science --jobs 2 --threads 1              # two runs at once, one thread per stage

Each (seed, variant) runs `moeflow pipeline --preset tiny --json` as a user would, with the pretraining,
RL and distillation seeds all set to the seed, in a home of its own per CPU variant and seed (outputs are
content-addressed by config and inputs, not by CPU, so variants must not share a store; two runs at once
must not write the same output either). The outcome-only R1-Zero recipe (`rl.rewards.steps_weight=0`)
then reruns RL, distillation and evaluation on the same pretrained base, in the same home. `--threads 1`
sets every stage to one thread (`*.threads=1`): on 2 cores, two one-thread runs side by side finish the
grid in about half the time, where 2-thread stages sharing the cores stall. Threads change the order of
floating-point sums, so a grid run with `--threads 1` is one more CPU code path, not the preset's exact
bits. Every finished run is appended to `bench/results/science_cpu.json` at once (a rerun skips the runs
it already has), and `science_cpu.md` is rewritten from it: one row per run, then mean ± sd and the
worst case per recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# The ATen/MKL code paths a user's x86-64 CPU may take, as environment settings that emulate them here.
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-baseline": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
}
RECIPES: dict[str, list[str]] = {
    "preset": [],  # the tiny preset as shipped (outcome + steps rewards)
    "outcome-only": ["rl.rewards.steps_weight=0"],  # DeepSeek-R1-Zero's rule-checked outcome reward alone
}
THREAD_KEYS = ("pretrain.threads", "rl.threads", "distill.threads", "eval.threads")
SEED_KEYS = ("pretrain.seed", "rl.seed", "distill.student.seed", "distill.sft.seed", "distill.traces.seed")
METRICS = ("pass@1", "greedy", "pass@8")


# What each variant changes on this machine: the bits of a few ops, computed in a fresh process per variant.
_BITS_SCRIPT = """
import hashlib, json, torch
torch.manual_seed(0)
a, b, x = torch.randn(257, 513), torch.randn(513, 129), torch.randn(64, 1000)
h = lambda t: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:12]
f = torch.nn.functional
print(json.dumps({"matmul": h(a @ b), "exp": h(x.exp()), "softmax": h(x.softmax(-1)), "sum": h(x.sum(-1)),
                  "rms_norm": h(f.rms_norm(x, (1000,))), "silu": h(f.silu(x)),
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""
BIT_OPS = ("matmul", "exp", "softmax", "sum", "rms_norm", "silu")


def variant_bits(variants: list[str]) -> dict[str, dict[str, str]]:
    """{variant: {op: digest, capability: ...}} (an empty dict for a variant whose process failed)."""
    out = {}
    for v in variants:
        proc = subprocess.run([sys.executable, "-c", _BITS_SCRIPT], env={**os.environ, **VARIANTS[v]},
                              capture_output=True, text=True, timeout=120)
        out[v] = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return out


def bits_table(bits: dict[str, dict[str, str]]) -> list[str]:
    """Markdown: which ops each variant changes against `default` on this machine."""
    base = bits.get("default", {})
    lines = ["| CPU variant | settings | ATen capability | " + " | ".join(BIT_OPS) + " |",
             "|---|---|---|" + "---|" * len(BIT_OPS)]
    for v, b in bits.items():
        cells = ["?" if not b or not base else ("same" if b[op] == base[op] else "**differs**") for op in BIT_OPS]
        settings = " ".join(f"{k}={val}" for k, val in VARIANTS[v].items()) or "(none)"
        lines.append(f"| {v} | `{settings}` | {b.get('capability', '?')} | " + " | ".join(cells) + " |")
    return lines


def seed_overrides(seed: int) -> list[str]:
    return [f"{key}={seed}" for key in SEED_KEYS]


def run_pipeline(seed: int, variant: str, recipe: str, home: Path, timeout_s: float,
                 threads: int | None = None) -> dict[str, Any]:
    """One `moeflow pipeline` run; returns its record (numbers, stage times) or raises with its last lines."""
    sets = [*seed_overrides(seed), *RECIPES[recipe]]
    if threads is not None:
        sets += [f"{key}={threads}" for key in THREAD_KEYS]
    cmd = [sys.executable, "-m", "flows.cli", "pipeline", "--preset", "tiny", "--json"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, **VARIANTS[variant], "MOEFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline exited {proc.returncode}:\n" + "\n".join(proc.stderr.splitlines()[-20:]))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return record(summary, seed=seed, variant=variant, recipe=recipe, seconds=time.time() - t0,
                  threads=threads)


def record(summary: dict[str, Any], **keys: Any) -> dict[str, Any]:
    """The numbers of one run: per model pass@1, greedy accuracy and pass@8, the gains, stage times."""
    report = _read_report(summary["report_uri"])
    rows = {r["name"]: r["metrics"] for r in report["rows"]}
    models = {name: {"pass@1": m.get("pass@1"), "greedy": m.get("greedy_accuracy"), "pass@8": m.get("pass@8")}
              for name, m in rows.items()}
    return {**keys, "models": models, "gains": summary["gains"],
            "stage_seconds": {k: v["seconds"] for k, v in summary["stages"].items()}}


def _read_report(report_uri: str) -> dict[str, Any]:
    from infra import storage

    return storage.read_json(storage.join_uri(report_uri, "report.json"))


def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown(runs: list[dict[str, Any]], machine: str, bits: dict[str, dict[str, str]] | None = None) -> str:
    lines = ["# Science benchmark: the tiny pipeline over seeds and CPU code paths\n",
             f"Machine: {machine}. Command: `python -m bench.science` (see its docstring). Percentages of "
             "held-out arithmetic problems (200 x 8 samples, T 0.6, top-p 0.95); gains in points.\n"]
    if bits:
        lines += ["What each CPU variant changes on this machine (the bits of each op against `default`; "
                  "a variant that changes nothing here is the same code path as `default`):", "",
                  *bits_table(bits), ""]
    lines += [
             "| recipe | seed | CPU variant | threads | base pass@1 | RL pass@1 | student pass@1 | RL gain "
             "| student kept | base / RL / student greedy | base / RL / student pass@8 | RL stage s | pipeline s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m, g = r["models"], r["gains"]
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {r['variant']} | {r.get('threads') or 'preset'} "
            f"| {pct(m['base']['pass@1'])} | {pct(m['rl']['pass@1'])} "
            f"| {pct(m['student']['pass@1'])} | {pct(g['rl_over_base'])} | {pct(g['student_kept'])} "
            f"| {' / '.join(pct(m[n]['greedy']) for n in ('base', 'rl', 'student'))} "
            f"| {' / '.join(pct(m[n]['pass@8']) for n in ('base', 'rl', 'student'))} "
            f"| {r['stage_seconds'].get('rl', 0):.0f} | {r['seconds']:.0f} |")
    lines += ["", "## Summary (mean ± sd over the runs; worst = the smallest RL gain)", "",
              "| recipe | CPU variant | runs | base pass@1 | RL pass@1 | student pass@1 | RL gain | worst RL gain "
              "| student kept | RL stage s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for recipe in sorted({r["recipe"] for r in runs}):
        of_recipe = [r for r in runs if r["recipe"] == recipe]
        variants = sorted({r["variant"] for r in of_recipe})
        groups = [("all", of_recipe)] + ([(v, [r for r in of_recipe if r["variant"] == v]) for v in variants]
                                         if len(variants) > 1 else [])
        for label, rs in groups:
            col = {n: [r["models"][n]["pass@1"] for r in rs] for n in ("base", "rl", "student")}
            gains = [r["gains"]["rl_over_base"] for r in rs]
            kept = [r["gains"]["student_kept"] for r in rs if r["gains"]["student_kept"] is not None]
            rl_s = [r["stage_seconds"].get("rl", 0.0) for r in rs]
            name = f"**{recipe}**" if label == "all" else recipe
            lines.append(f"| {name} | {label} | {len(rs)} | {mean_sd(col['base'])} | {mean_sd(col['rl'])} | "
                         f"{mean_sd(col['student'])} | {mean_sd(gains)} | {pct(min(gains))} | {mean_sd(kept)} | "
                         f"{statistics.mean(rl_s):.0f} |")
    return "\n".join(lines) + "\n"


def machine_name() -> str:
    import torch

    from components.common.system import cpu_model

    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({isa})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.science", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--out", default=str(RESULTS / "science_cpu"), help="results path without extension")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one pipeline run may take")
    p.add_argument("--work", default=None, help="folder for the runs' homes (default: a temporary one)")
    p.add_argument("--jobs", type=int, default=1, help="pipeline runs at a time (each its own processes)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of every stage (default: the preset's); 1 with --jobs 2 on 2 cores")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants, recipes = args.variants.split(","), args.recipes.split(",")
    for name, known in ((variants, VARIANTS), (recipes, RECIPES)):
        bad = [n for n in name if n not in known]
        if bad:
            p.error(f"unknown {bad}; choose from {list(known)}")
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
    runs: list[dict[str, Any]] = json.loads(out_json.read_text()) if out_json.exists() else []
    done = {(r["recipe"], r["seed"], r["variant"]) for r in runs}
    todo = [(rc, s, v) for s in seeds for v in variants for rc in recipes if (rc, s, v) not in done]
    work = Path(args.work or tempfile.mkdtemp(prefix="moeflow-science-"))
    machine = machine_name()
    bits = variant_bits(list(VARIANTS))
    # one job per (variant, seed): its recipes run in order in one home, so they share the pretrained base
    jobs: dict[tuple[str, int], list[str]] = {}
    for recipe, seed, variant in todo:
        jobs.setdefault((variant, seed), []).append(recipe)
    lock = threading.Lock()
    t_start, n_done = time.time(), 0

    def run_job(variant: str, seed: int, job_recipes: list[str]) -> None:
        nonlocal n_done
        home = work / variant / f"seed{seed}"
        home.mkdir(parents=True, exist_ok=True)
        for recipe in job_recipes:
            with lock:  # one line at a time from the jobs' threads
                print(f"start: recipe {recipe}, seed {seed}, CPU variant {variant}", flush=True)
            try:
                r = run_pipeline(seed, variant, recipe, home, args.timeout, args.threads)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                with lock:
                    n_done += 1
                    print(f"  failed (recipe {recipe}, seed {seed}, {variant}): {exc}", flush=True)
                continue
            with lock:
                n_done += 1
                runs.append(r)
                out_json.parent.mkdir(parents=True, exist_ok=True)
                out_json.write_text(json.dumps(runs, indent=1) + "\n")
                out_md.write_text(markdown(runs, machine, bits))
                left = len(todo) - n_done
                eta = (time.time() - t_start) / n_done * left / 60
                print(f"[{n_done}/{len(todo)}] recipe {recipe}, seed {seed}, {variant}: base "
                      f"{pct(r['models']['base']['pass@1'])}, RL {pct(r['models']['rl']['pass@1'])} "
                      f"({pct(r['gains']['rl_over_base'])} points), student {pct(r['models']['student']['pass@1'])}"
                      f", {r['seconds']:.0f} s; ETA {eta:.0f} min", flush=True)

    print(f"{len(todo)} runs in {len(jobs)} jobs, {args.jobs} at a time, homes under {work}", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for fut in [pool.submit(run_job, v, s_, rs) for (v, s_), rs in jobs.items()]:
            fut.result()
    print(f"wrote {out_md} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
