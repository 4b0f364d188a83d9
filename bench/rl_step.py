"""Where a GRPO step's time goes, and what the RL step's two speed-ups buy, measured in one process.

    python -m bench.rl_step --model <moeflow model dir> --dataset <prepared dataset dir> [--threads 2]

On the tiny preset's settings (`configs/tiny.yaml`'s `rl` section, `--set` overrides), from one base:
- sampling: `generate.draw` (one uniform per row, inverse CDF) against `torch.multinomial(probs, 1)` (one
  exponential per vocabulary entry) on a rollout-sized batch of probabilities (128 x vocabulary);
- rollout: `GRPOTrainer.rollout` as shipped (its sampling is `draw`), and with `torch.multinomial`
  patched back in, alternating, `--reps` each;
- update: `GRPOTrainer.update` on one fixed rollout, alternating, `--reps` each: as shipped (each prompt once
  against its KV cache, `grpo.shared_prompts`; the entropy from the sampler's per-token entropies; the
  log-prob loss's backward from the rows its forward kept, `keeps_rows`); with the session-7 update (the
  entropy from a second pass over the vocabulary, the loss's logits recomputed in the backward); and with
  one forward per prompt + completion row besides (the baseline before shared prompts). The log-probs of
  the two forwards are compared on that rollout;
- training steps: `--steps` `GRPOTrainer.train_step`s from the base: sequential, and with
  `grpo.overlap_rollout` (the next rollout sampled during the update) in a thread of the trainer's process
  and in a sampler process (`grpo.rollout_worker`), twice each, alternating; the median step of each (the
  first two steps of every run left out).
The medians go to `bench/results/rl_step_cpu.md` (+ `.json`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any

from bench.trl_grpo import REPO, RESULTS, Setup, rl_config


def measure(s: Setup, reps: int, steps: int) -> dict[str, Any]:
    import importlib

    import torch

    from bench.model import _best
    from components.rl.trainer import GRPOTrainer, build_batch, token_logprobs

    gen = importlib.import_module("components.model.generate")  # the module: the package exports a function so named
    model = s.base()
    tr = GRPOTrainer(model, s.tokenizer, s.pool, s.cfg.grpo, s.cfg.rewards, seed=0)
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(s.cfg.grpo.prompts_per_step * s.cfg.grpo.group_size, model.cfg.vocab_size,
                        generator=g).mul(3).softmax(-1)
    median = lambda times: {k: statistics.median(v) for k, v in times.items()}  # noqa: E731
    draws = median(_best({"draw": lambda: gen.draw(probs, g),
                          "multinomial": lambda: torch.multinomial(probs, 1, generator=g)}, 50 * reps))
    out: dict[str, Any] = {"draw_ms": 1e3 * draws["draw"], "multinomial_ms": 1e3 * draws["multinomial"]}

    shipped = gen.draw

    def rollout_with(sampler):
        gen.draw = sampler
        try:
            tr.rollout()
        finally:
            gen.draw = shipped

    multinomial = lambda p, gen_: torch.multinomial(p, 1, generator=gen_).squeeze(1)  # noqa: E731
    out["rollout_s"] = median(_best({"draw": lambda: rollout_with(shipped),
                                     "multinomial": lambda: rollout_with(multinomial)}, reps))

    ro = tr.rollout()
    batch = build_batch(ro.prompt_ids, ro.results, tr.pad)
    model.train()
    with torch.no_grad():
        lp_row, _ = token_logprobs(model, batch, s.cfg.grpo.temperature, shared_prompts=False)
        lp_shared, _ = token_logprobs(model, batch, s.cfg.grpo.temperature, shared_prompts=True)
    v = batch.valid_BT
    out["logp_max_abs_diff"] = float((lp_row - lp_shared)[v].abs().max())
    out["rows"], out["row_len"] = int(batch.input_ids_BL.shape[0]), int(batch.input_ids_BL.shape[1])
    out["tokens_row_forward"] = sum(len(ro.prompt_ids[r.prompt_index]) + len(r.tokens) for r in ro.results)
    out["tokens_shared"] = sum(map(len, ro.prompt_ids)) + sum(len(r.tokens) for r in ro.results)

    from kernels import ops
    from kernels.reference import chunked

    stripped = copy.deepcopy(ro)  # no sampler entropies: the update computes them over the vocabulary
    for r in stripped.results:
        r.entropies = None

    def update_with(shared: bool, session7: bool):
        tr.cfg = tr.cfg.model_copy(update={"shared_prompts": shared})
        keeps = chunked.keeps_rows
        if session7:
            chunked.keeps_rows = ops.keeps_rows = lambda *a: False
        try:
            tr.update(stripped if session7 else ro)
        finally:
            chunked.keeps_rows = ops.keeps_rows = keeps

    out["update_s"] = median(_best({"shipped": lambda: update_with(True, False),
                                    "session7": lambda: update_with(True, True),
                                    "row_forward": lambda: update_with(False, True)}, reps))

    def step_time(mode: str) -> float:
        g = s.cfg.grpo.model_copy(update={"overlap_rollout": mode != "sequential", "steps": max(steps, g0.steps),
                                          "rollout_worker": "process" if mode == "process" else "thread"})
        t = GRPOTrainer(s.base(), s.tokenizer, s.pool, g, s.cfg.rewards, seed=0)
        try:
            for _ in range(steps):
                t.train_step()
        finally:
            t.close()
        return statistics.median(h["time/step_s"] for h in t.history[2:])

    g0 = s.cfg.grpo
    runs: dict[str, list[float]] = {"sequential": [], "overlapped": [], "process": []}
    for _ in range(2):
        for mode, times in runs.items():
            times.append(step_time(mode))
    out["step_s"] = {k: statistics.median(v) for k, v in runs.items()}
    out["steps"] = steps
    return out


def markdown(r: dict[str, Any], header: str) -> str:
    roll, upd, step = r["rollout_s"], r["update_s"], r["step_s"]
    before = roll["multinomial"] + upd["row_forward"]
    after = roll["draw"] + upd["shipped"]
    return "\n".join([
        header, "",
        "| part | baseline | moeflow now | ratio |", "|---|---|---|---|",
        f"| one draw, {r['batch']} x {r['vocab']} probabilities | multinomial {r['multinomial_ms']:.2f} ms | "
        f"draw {r['draw_ms']:.2f} ms | {r['multinomial_ms'] / r['draw_ms']:.1f}x |",
        f"| rollout ({r['batch']} completions) | multinomial {roll['multinomial']:.3f} s | draw {roll['draw']:.3f} s | "
        f"{roll['multinomial'] / roll['draw']:.2f}x |",
        f"| update (one rollout, {r['rows']} rows) | row forward {upd['row_forward']:.3f} s "
        f"({r['tokens_row_forward']} tokens) | shared prompts {upd['shipped']:.3f} s ({r['tokens_shared']} "
        f"tokens) | {upd['row_forward'] / upd['shipped']:.2f}x |",
        f"| update: entropy and loss backward | session 7 (entropy pass, logits recomputed) {upd['session7']:.3f} s "
        f"| sampler entropy, kept rows {upd['shipped']:.3f} s | {upd['session7'] / upd['shipped']:.2f}x |",
        f"| rollout + update | {before:.3f} s | {after:.3f} s | {before / after:.2f}x |",
        f"| training step (median of {r['steps'] - 2}, 2 runs each) | sequential {step['sequential']:.3f} s "
        f"| overlapped rollout, sampler thread {step['overlapped']:.3f} s | "
        f"{step['sequential'] / step['overlapped']:.2f}x |",
        f"| training step, overlapped rollout | sampler thread {step['overlapped']:.3f} s | sampler process "
        f"{step['process']:.3f} s | {step['overlapped'] / step['process']:.2f}x |", "",
        f"Log-probs of the two update forwards on that rollout: largest difference {r['logp_max_abs_diff']:.1e}.",
        "A training step also computes rewards, metrics and checkpoints; `moeflow rl` logs its seconds a step.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rl_step", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a moeflow model directory (e.g. pretrain's model)")
    p.add_argument("--dataset", type=Path, required=True, help="the prepared dataset directory")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=14, help="training steps per run of the step comparison")
    p.add_argument("--tag", default="rl_step_cpu", help="results file stem under bench/results/")
    args = p.parse_args(argv)
    import torch

    from components.common.system import cpu_model

    torch.set_num_threads(args.threads)
    s = Setup(args.model, args.dataset, rl_config(args.config, args.sets))
    r = measure(s, args.reps, args.steps)
    g = s.cfg.grpo
    r.update(batch=g.prompts_per_step * g.group_size, vocab=s.model_cfg.vocab_size, threads=args.threads,
             machine=cpu_model(), torch=torch.__version__)
    header = (f"# The GRPO step's speed-ups, measured in one process\n\nMachine: {r['machine']}, torch "
              f"{r['torch']}, {args.threads} threads. Command: `python -m bench.rl_step --model <pretrain model> "
              f"--dataset <prep dataset> --threads {args.threads} --reps {args.reps} --steps {args.steps}`; medians, "
              "the tiny preset's "
              f"settings ({g.prompts_per_step} prompts x {g.group_size} samples, T {g.temperature}).")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(r, indent=1) + "\n")
    (RESULTS / f"{args.tag}.md").write_text(markdown(r, header))
    print(markdown(r, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
