"""The science benchmark: the tiny pipeline over several seeds and over the CPU code paths this machine can
emulate, so that the README's numbers, the preset and the end-to-end thresholds rest on a distribution,
never on one run of one CPU.

    python -m bench.science                                   # 3 seeds x 5 CPU variants x 2 recipes
    python -m bench.science --seeds 0 --variants default      # one run (~11 minutes on 2 idle cores)

Each (seed, variant) runs `moeflow pipeline --preset tiny --json` as a user would, with the pretraining,
RL and distillation seeds all set to the seed, in a home of its own per CPU variant (outputs are
content-addressed by config and inputs, not by CPU, so variants must not share a store; seeds may). The
outcome-only R1-Zero recipe (`rl.rewards.steps_weight=0`) reruns RL, distillation and evaluation on the
same pretrained base. Every finished run is appended to `bench/results/science_cpu.json` at once (a
rerun skips the runs it already has), and `science_cpu.md` is rewritten from it: one row per run, then
mean ± sd and the worst case per recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
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
SEED_KEYS = ("pretrain.seed", "rl.seed", "distill.student.seed", "distill.sft.seed", "distill.traces.seed")
METRICS = ("pass@1", "greedy", "pass@8")


def seed_overrides(seed: int) -> list[str]:
    return [f"{key}={seed}" for key in SEED_KEYS]


def run_pipeline(seed: int, variant: str, recipe: str, home: Path, timeout_s: float) -> dict[str, Any]:
    """One `moeflow pipeline` run; returns its record (numbers, stage times) or raises with its last lines."""
    sets = [*seed_overrides(seed), *RECIPES[recipe]]
    cmd = [sys.executable, "-m", "flows.cli", "pipeline", "--preset", "tiny", "--json"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, **VARIANTS[variant], "MOEFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline exited {proc.returncode}:\n" + "\n".join(proc.stderr.splitlines()[-20:]))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return record(summary, seed=seed, variant=variant, recipe=recipe, seconds=time.time() - t0)


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


def markdown(runs: list[dict[str, Any]], machine: str) -> str:
    lines = ["# Science benchmark: the tiny pipeline over seeds and CPU code paths\n",
             f"Machine: {machine}. Command: `python -m bench.science` (see its docstring). Percentages of "
             "held-out arithmetic problems (200 x 8 samples, T 0.6, top-p 0.95); gains in points.\n",
             "| recipe | seed | CPU variant | base pass@1 | RL pass@1 | student pass@1 | RL gain | student kept "
             "| base / RL / student greedy | base / RL / student pass@8 | RL stage s | pipeline s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m, g = r["models"], r["gains"]
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {r['variant']} | {pct(m['base']['pass@1'])} | {pct(m['rl']['pass@1'])} "
            f"| {pct(m['student']['pass@1'])} | {pct(g['rl_over_base'])} | {pct(g['student_kept'])} "
            f"| {' / '.join(pct(m[n]['greedy']) for n in ('base', 'rl', 'student'))} "
            f"| {' / '.join(pct(m[n]['pass@8']) for n in ('base', 'rl', 'student'))} "
            f"| {r['stage_seconds'].get('rl', 0):.0f} | {r['seconds']:.0f} |")
    lines += ["", "## Summary (mean ± sd over the runs; worst = the smallest RL gain)", "",
              "| recipe | runs | base pass@1 | RL pass@1 | student pass@1 | RL gain | worst RL gain | student kept "
              "| RL stage s |", "|---|---|---|---|---|---|---|---|---|"]
    for recipe in sorted({r["recipe"] for r in runs}):
        rs = [r for r in runs if r["recipe"] == recipe]
        col = {n: [r["models"][n]["pass@1"] for r in rs] for n in ("base", "rl", "student")}
        gains = [r["gains"]["rl_over_base"] for r in rs]
        kept = [r["gains"]["student_kept"] for r in rs if r["gains"]["student_kept"] is not None]
        rl_s = [r["stage_seconds"].get("rl", 0.0) for r in rs]
        lines.append(f"| {recipe} | {len(rs)} | {mean_sd(col['base'])} | {mean_sd(col['rl'])} | "
                     f"{mean_sd(col['student'])} | {mean_sd(gains)} | {pct(min(gains))} | {mean_sd(kept)} | "
                     f"{statistics.mean(rl_s):.0f} |")
    return "\n".join(lines) + "\n"


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.science", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--out", default=str(RESULTS / "science_cpu"), help="results path without extension")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one pipeline run may take")
    p.add_argument("--work", default=None, help="folder for the runs' homes (default: a temporary one)")
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
    todo = [(rc, s, v) for v in variants for s in seeds for rc in recipes if (rc, s, v) not in done]
    work = Path(args.work or tempfile.mkdtemp(prefix="moeflow-science-"))
    machine = machine_name()
    t_start = time.time()
    for i, (recipe, seed, variant) in enumerate(todo):
        home = work / variant  # one store per CPU variant; seeds and recipes share it (content-addressed)
        home.mkdir(parents=True, exist_ok=True)
        eta = "" if i == 0 else f", ETA {(time.time() - t_start) / i * (len(todo) - i) / 60:.0f} min"
        print(f"[{i + 1}/{len(todo)}] recipe {recipe}, seed {seed}, CPU variant {variant}{eta}", flush=True)
        try:
            runs.append(run_pipeline(seed, variant, recipe, home, args.timeout))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"  failed: {exc}", flush=True)
            continue
        r = runs[-1]
        print(f"  base {pct(r['models']['base']['pass@1'])}, RL {pct(r['models']['rl']['pass@1'])} "
              f"({pct(r['gains']['rl_over_base'])} points), student {pct(r['models']['student']['pass@1'])}, "
              f"{r['seconds']:.0f} s", flush=True)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(runs, indent=1) + "\n")
        out_md.write_text(markdown(runs, machine))
    print(f"wrote {out_md} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
