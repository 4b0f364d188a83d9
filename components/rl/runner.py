"""The RL stage's work: R1-Zero (GRPO from the base) or R1 (cold-start SFT, then GRPO), with held-out
evaluation, checkpoints/resume and the published policy.

Outputs under the stage's content-addressed location::

    model/        the policy (`components.refs.checkpoint.save_model` layout: loads with `load_model`)
    report/       summary.json (metrics, evaluations, reward curve), history.json (per-step metrics),
                  samples.json (sample completions per interval), reward_curve.png
    cold_start/   r1 only: the model after the cold-start SFT (also what a restarted run resumes from)
    traces/       with rejection.enabled: verified-correct completions as an SFT dataset
    checkpoints/  step_XXXXXXX/ every `checkpoint.every` steps; a retried job resumes from the newest

Held-out accuracy is `components.scoring.evaluate.evaluate`'s pass@1 on the first `eval.n_problems` problems
of the dataset's `eval/<family>.jsonl`, with the same seed at every evaluation, so the numbers before and
after RL differ only by the model.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from components.common.system import available_cores, eta
from components.dataset.format import eval_problem_ids
from components.model.compile import compile_model
from components.refs import checkpoint as ckpt
from components.refs.models import local_dir
from components.rl import report
from components.rl.config import RLConfig
from components.rl.sampler import frozen_copy, warm_rope
from components.rl.trainer import GRPOTrainer
from components.tasks import Problem, make_split
from infra import storage
from infra.contract import ConfigError, StageContext, StageOutput

log = logging.getLogger("moeflow.rl")

MODEL_DIR, REPORT_DIR, COLD_START_DIR, TRACES_DIR = "model", "report", "cold_start", "traces"


# ------------------------------------------------------------------------------------------ problems
def heldout_problems(dataset_dir: Path, family: str, n: int) -> list[Problem]:
    from components.dataset.format import DatasetFormatError, load_eval_split

    try:
        rows = load_eval_split(dataset_dir, family)
    except DatasetFormatError as exc:
        raise ConfigError(f"rl.eval.family: {exc}") from None
    return [Problem.from_dict(r) for r in rows[:n]]


def with_dataset_knobs(cfg: RLConfig, dataset_dir: Path) -> RLConfig:
    """RL prompts are drawn like the dataset's held-out problems: the dataset's task knobs, unless
    `rl.tasks.knobs` sets a family's own."""
    from components.dataset.format import load_dataset_meta

    knobs = (load_dataset_meta(dataset_dir).get("tasks") or {}).get("knobs", {})
    merged = {**knobs, **cfg.tasks.knobs}
    return cfg.model_copy(update={"tasks": cfg.tasks.model_copy(update={"knobs": merged})})


def per_family(n: int, families: list[str]) -> list[int]:
    """`n` split over the families as evenly as possible (the first ones get the remainder)."""
    q, r = divmod(n, len(families))
    return [q + (i < r) for i in range(len(families))]


def prompt_pool(cfg: RLConfig, exclude: set[str]) -> list[Problem]:
    """The RL prompts: fresh problems of each family, disjoint from `exclude` (held-out ids)."""
    pool: list[Problem] = []
    for family, n in zip(cfg.tasks.families, per_family(cfg.tasks.n_prompts, cfg.tasks.families), strict=True):
        try:
            pool.extend(make_split(cfg.tasks.family(family), n, cfg.tasks.seed, exclude_ids=exclude))
        except ValueError as exc:
            raise ConfigError(f"rl.tasks.n_prompts: {exc}") from None
    return pool


def rejection_problems(cfg: RLConfig, exclude: set[str]) -> list[Problem]:
    """Fresh problems for rejection sampling after RL (none unless enabled), disjoint from `exclude`."""
    r = cfg.rejection
    if not r.enabled:
        return []
    problems: list[Problem] = []
    for family in cfg.tasks.families:
        try:
            problems.extend(make_split(cfg.tasks.family(family), r.n_problems, r.seed, exclude_ids=exclude))
        except ValueError as exc:
            raise ConfigError(f"rl.rejection.n_problems: {exc}") from None
    return problems


def cold_start_examples(cfg: RLConfig, exclude: set[str]) -> list[dict[str, str]]:
    """R1's cold-start data: worked, correct, formatted solutions of fresh problems, plus given traces."""
    from components.sft.traces import load_traces

    examples: list[dict[str, str]] = []
    cs = cfg.cold_start
    for family, n in zip(cfg.tasks.families, per_family(cs.n_examples, cfg.tasks.families), strict=True):
        try:
            problems = make_split(cfg.tasks.family(family), n, cs.seed, exclude_ids=exclude)
        except ValueError as exc:
            raise ConfigError(f"rl.cold_start.n_examples: {exc}") from None
        examples.extend({"prompt": p.prompt, "completion": p.completion(correct=True)}
                        for p in problems if p.solution is not None)
    if cs.traces:
        try:
            examples.extend({"prompt": t["prompt"], "completion": t["completion"]} for t in load_traces(cs.traces))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"rl.cold_start.traces: {exc}") from None
    if not examples:
        raise ConfigError("rl.cold_start: no cold-start examples; raise cold_start.n_examples or set cold_start.traces")
    return examples


# --------------------------------------------------------------------------------------------- run
class RLRun:
    """One RL stage run inside its job (single process)."""

    def __init__(self, cfg: RLConfig, ctx: StageContext, inputs: dict[str, str]):
        self.cfg, self.ctx, self.inputs = cfg, ctx, inputs
        self.evals: list[dict[str, float]] = []
        self.cold_start_metrics: dict[str, float] = {}
        self.resumed_from: int | None = None
        self.seconds = {"eval": 0.0, "cold_start": 0.0, "rl": 0.0}

    def log(self, msg: str, *args: Any) -> None:
        log.info(msg, *args)

    # --- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, step: int, label: str) -> dict[str, float]:
        from components.scoring.evaluate import evaluate
        from infra.tracking import metric_key

        e = self.cfg.eval
        t0 = time.perf_counter()
        res = evaluate(model, self.tokenizer, self.heldout, n_samples=e.n_samples, temperature=e.temperature,
                       top_p=e.top_p, max_new_tokens=e.max_new_tokens, seed=e.seed, greedy=False,
                       batch_size=e.batch_size, keep_samples=False)
        m = res["metrics"]
        row = {"step": float(step), "pass@1": m["pass@1"], "pass@1_stderr": m["pass@1_stderr"],
               "format_rate": m["format_rate"], "mean_response_tokens": m["mean_response_tokens"],
               "seconds": time.perf_counter() - t0}
        self.seconds["eval"] += row["seconds"]
        self.evals.append({**row, "label": label})  # type: ignore[dict-item]
        self.ctx.tracker.log_metrics({f"eval/{metric_key(k)}": v for k, v in row.items() if k != "step"}, step=step)
        self.log("held-out %s pass@1 (%s, %d problems x %d samples): %.3f ± %.3f  (%.1fs)", e.family, label,
                 len(self.heldout), e.n_samples, row["pass@1"], row["pass@1_stderr"], row["seconds"])
        return row

    # --- setup --------------------------------------------------------------------------------------
    def load(self) -> None:
        from components.dataset.format import load_tokenizer

        cfg = self.cfg
        self.model_dir = local_dir(self.inputs["model"], "rl.model")
        self.dataset_dir = local_dir(self.inputs["dataset"], "rl.dataset")
        try:
            self.model, self.model_cfg = ckpt.load_model(self.model_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"rl.model: {exc}") from None
        warm_rope(self.model)  # before any generation (see warm_rope)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.cfg = cfg = with_dataset_knobs(cfg, self.dataset_dir)
        self.heldout = heldout_problems(self.dataset_dir, cfg.eval.family, cfg.eval.n_problems)
        self.exclude = eval_problem_ids(self.dataset_dir)
        self.pool = prompt_pool(cfg, self.exclude)
        self.rejection_problems = rejection_problems(cfg, self.exclude | {p.id for p in self.pool})
        longest = max(len(self.tokenizer.encode(p.prompt).ids) for p in self.pool[:200])
        limit = self.model_cfg.max_position_embeddings
        if longest + cfg.rewards.max_completion_len > limit:
            raise ConfigError(f"rl.rewards.max_completion_len ({cfg.rewards.max_completion_len}) + prompts of "
                              f"{longest} tokens exceed the model's max_position_embeddings ({limit}); lower it")
        self.log("RL (%s) on %s: %d prompts (%s), held-out %d %s problems", cfg.recipe, self.inputs["model"],
                 len(self.pool), ", ".join(cfg.tasks.families), len(self.heldout), cfg.eval.family)

    def cold_start(self) -> None:
        """R1: SFT on formatted traces (or load its published result when a retried job finds it)."""
        from components.sft.sft import sft_train

        uri = storage.join_uri(self.ctx.output_uri, COLD_START_DIR)
        if storage.is_published(uri):
            model, _ = ckpt.load_model(uri)
            self.model.load_state_dict(model.state_dict())
            info = storage.read_json(storage.join_uri(uri, "training.json"))
            self.cold_start_metrics = info.get("cold_start", {})
            self.evals = info.get("evals", [])
            self.log("cold start: loaded %s", uri)
            return
        cfg = self.cfg
        examples = cold_start_examples(cfg, self.exclude | {p.id for p in self.pool})
        t0 = time.perf_counter()
        self.log("cold start: SFT on %d formatted traces", len(examples))
        metrics = sft_train(self.model, self.tokenizer, examples, cfg.cold_start.sft, tracker=None,
                            log=lambda line: self.log("cold start: %s", line))
        self.seconds["cold_start"] = time.perf_counter() - t0
        self.cold_start_metrics = {"examples": float(len(examples)), **metrics}
        self.ctx.tracker.log_metrics({f"cold_start/{k}": v for k, v in metrics.items()
                                      if isinstance(v, float) and math.isfinite(v)}, step=0)
        self.model.eval()
        self.evaluate(self.model, 0, "cold start")
        local = self.ctx.workdir / COLD_START_DIR
        shutil.rmtree(local, ignore_errors=True)
        ckpt.save_model(self.model, self.model_cfg, local, self.model_dir,
                        extra={"cold_start": self.cold_start_metrics, "evals": self.evals})
        storage.publish_dir(local, uri, meta={"kind": "model", "lineage": self.ctx.lineage}, overwrite=True)
        shutil.rmtree(local, ignore_errors=True)

    # --- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, trainer: GRPOTrainer) -> str:
        local = self.ctx.workdir / "checkpoint-staging" / ckpt.step_name(trainer.step)
        state = {**trainer.state_dict(), "evals": self.evals, "cold_start": self.cold_start_metrics,
                 "seconds": dict(self.seconds)}
        summary = {"step": trainer.step, "steps": self.cfg.grpo.steps, "evals": self.evals,
                   "last_metrics": trainer.history[-1] if trainer.history else {}}
        ckpt.write_checkpoint(local, model_state=self.model.state_dict(),
                              optimizer_state=trainer.optimizer.state_dict(), trainer_state=state,
                              summary=summary, model_cfg=self.model_cfg)
        uri = ckpt.publish_checkpoint(local, self.ctx.output_uri, trainer.step,
                                      meta={"lineage": {"stage": "rl", "key": self.ctx.lineage.get("key")}})
        ckpt.prune_checkpoints(self.ctx.output_uri, self.cfg.checkpoint.keep)
        return uri

    def restore(self, trainer: GRPOTrainer) -> bool:
        latest = ckpt.latest_checkpoint(self.ctx.output_uri) if self.cfg.checkpoint.resume else None
        if latest is None:
            return False
        step, uri = latest
        files = ckpt.read_checkpoint(ckpt.fetch_checkpoint(uri))
        self.model.load_state_dict(files["model"])
        st = files["trainer"]
        trainer.load_state_dict(st, files["optimizer"])
        self.evals = list(st["evals"])
        self.cold_start_metrics = dict(st["cold_start"])
        self.seconds = dict(st["seconds"])
        self.resumed_from = step
        self.log("resumed from %s (step %d of %d)", uri, step, self.cfg.grpo.steps)
        return True

    # --- the run ------------------------------------------------------------------------------------
    def run(self) -> StageOutput:
        cfg, ctx = self.cfg, self.ctx
        threads_before = torch.get_num_threads()
        torch.set_num_threads(cfg.threads or available_cores())
        try:
            self.load()
            if cfg.compile:  # the policy's training forward (hidden_states); rollouts stay eager
                compile_model(self.model)
            trainer = GRPOTrainer(self.model, self.tokenizer, self.pool, cfg.grpo, cfg.rewards, seed=cfg.seed,
                                  samples=cfg.samples)
            if not self.restore(trainer):
                self.evaluate(self.model, 0, "base")
                if cfg.recipe == "r1":
                    self.cold_start()
            if cfg.grpo.beta > 0:  # the reference is the policy RL started from: the base or the cold start
                start_uri = (storage.join_uri(ctx.output_uri, COLD_START_DIR) if cfg.recipe == "r1"
                             else self.inputs["model"])
                trainer.set_reference(frozen_copy(ckpt.load_model(start_uri)[0]))
            try:
                self.train(trainer)
            finally:
                trainer.close()
            return self.finish(trainer)
        finally:
            torch.set_num_threads(threads_before)
            if hasattr(ctx.tracker, "flush"):
                ctx.tracker.flush()

    def train(self, trainer: GRPOTrainer) -> None:
        cfg, ctx = self.cfg, self.ctx
        g = cfg.grpo
        self.log("GRPO: %d steps x %d prompts x %d samples, mu %d, eps [%g, %g], beta %g, %s aggregation, "
                 "std scale %s%s", g.steps, g.prompts_per_step, g.group_size, g.mu, g.eps_low, g.eps_high, g.beta,
                 g.aggregation, g.advantage_scale, ", dynamic sampling" if g.dynamic_sampling else "")
        t_loop = t_start = time.perf_counter()
        first_step = trainer.step  # a resumed run's pace counts from where it resumed
        def evaluates(step: int) -> bool:
            return bool(cfg.eval.every) and step % cfg.eval.every == 0 and step < g.steps

        def checkpoints(step: int) -> bool:
            return step % cfg.checkpoint.every == 0 and step < g.steps

        while trainer.step < g.steps:
            nxt = trainer.step + 1  # an evaluation or checkpoint after this step drains an overlapped rollout
            m = trainer.train_step(prefetch=not (evaluates(nxt) or checkpoints(nxt)))
            step = trainer.step
            ctx.tracker.log_metrics({k: v for k, v in m.items() if k != "step"}, step=step)
            if step % cfg.log_every == 0 or step == 1 or step == g.steps:
                self.log("step %d/%d reward %.3f (acc %.3f fmt %.2f steps %.2f) len %.1f kl_s %.1e clip %.3f "
                         "ent %.3f dropped %d  %.2fs/step, eta %s", step, g.steps, m["reward/total"],
                         m["reward/accuracy"], m["reward/format"], m["reward/steps"], m["response_length"],
                         m["kl_sampler"], m["clip_fraction"], m.get("entropy", float("nan")), m["groups/dropped"],
                         m["time/step_s"], eta(step - first_step, g.steps - first_step,
                                               time.perf_counter() - t_start))
            if evaluates(step):
                self.evaluate(self.model, step, f"step {step}")
            if checkpoints(step):
                self.seconds["rl"] += time.perf_counter() - t_loop
                t_loop = time.perf_counter()
                self.save_checkpoint(trainer)
        self.seconds["rl"] += time.perf_counter() - t_loop

    def finish(self, trainer: GRPOTrainer) -> StageOutput:
        cfg, ctx = self.cfg, self.ctx
        if not (self.evals and self.evals[-1].get("label") == "final"):  # a resumed run may have it already
            self.evaluate(self.model, trainer.step, "final")
        self.save_checkpoint(trainer)
        history = trainer.history
        reward_start, reward_end = report.reward_start_end(history)
        acc_start = next(e["pass@1"] for e in self.evals if e.get("label") == "base")
        acc_end = self.evals[-1]["pass@1"]
        metrics = {
            "reward_start": reward_start, "reward_end": reward_end,
            "accuracy_start": acc_start, "accuracy_end": acc_end, "accuracy_gain": acc_end - acc_start,
            "train_accuracy_start": report.reward_start_end(history, "reward/accuracy")[0],
            "train_accuracy_end": report.reward_start_end(history, "reward/accuracy")[1],
            "steps": float(trainer.step), "rl_seconds": self.seconds["rl"], "eval_seconds": self.seconds["eval"],
            "cold_start_seconds": self.seconds["cold_start"],
            "response_length_end": report.reward_start_end(history, "response_length")[1],
        }
        cold = next((e for e in self.evals if e.get("label") == "cold start"), None)
        if cold is not None:
            metrics["accuracy_cold_start"] = cold["pass@1"]
        if self.resumed_from is not None:
            metrics["resumed_from_step"] = float(self.resumed_from)
        outputs: dict[str, str] = {}
        summary = {"metrics": metrics, "evals": self.evals, "cold_start": self.cold_start_metrics,
                   "reward_curve": {"step": [h["step"] for h in history],
                                    "reward": [h["reward/total"] for h in history],
                                    "accuracy": [h["reward/accuracy"] for h in history],
                                    "window": report.curve_window(len(history))},
                   "recipe": cfg.recipe, "eval_family": cfg.eval.family,
                   "eval_problems": len(self.heldout), "eval_samples": cfg.eval.n_samples}

        if cfg.rejection.enabled:
            outputs["traces"], summary["rejection"] = self.rejection_sample()
            metrics["traces"] = float(summary["rejection"]["kept"])

        fig = report.reward_curve_figure(history, [e for e in self.evals],
                                         title=f"GRPO ({cfg.recipe}) reward and held-out pass@1")
        local = ctx.workdir / REPORT_DIR
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        fig.savefig(local / "reward_curve.png", dpi=110, bbox_inches="tight")
        storage_json = {"summary.json": summary, "history.json": history, "samples.json": trainer.sample_rows}
        for name, obj in storage_json.items():
            (local / name).write_text(_dumps(obj))
        ctx.tracker.log_metrics(metrics, step=trainer.step)
        ctx.tracker.log_figure(fig, "plots/reward_curve.png")
        ctx.tracker.log_dict(trainer.sample_rows, "samples/samples.json")
        for step in sorted({r["step"] for r in trainer.sample_rows}):
            ctx.tracker.log_dict([r for r in trainer.sample_rows if r["step"] == step], f"samples/step_{step:05d}.json")
        ctx.tracker.log_dict(summary, "rl_summary.json")
        report_uri = storage.join_uri(ctx.output_uri, REPORT_DIR)
        storage.publish_dir(local, report_uri, meta={"kind": "rl-report", "lineage": ctx.lineage}, overwrite=True)
        shutil.rmtree(local, ignore_errors=True)

        model_uri = storage.join_uri(ctx.output_uri, MODEL_DIR)
        local = ctx.workdir / MODEL_DIR
        shutil.rmtree(local, ignore_errors=True)
        training = {"stage": "rl", "recipe": cfg.recipe, "steps": trainer.step, "base_model": self.inputs["model"],
                    "dataset": self.inputs["dataset"], "metrics": metrics, "lineage": ctx.lineage}
        ckpt.save_model(self.model, self.model_cfg, local, self.model_dir, extra=training)
        storage.publish_dir(local, model_uri, meta={"kind": "model", "lineage": ctx.lineage}, overwrite=True)
        shutil.rmtree(local, ignore_errors=True)
        outputs = {"checkpoint": model_uri, "report": report_uri, **outputs}
        if cfg.recipe == "r1":
            outputs["cold_start"] = storage.join_uri(ctx.output_uri, COLD_START_DIR)
        self.log("RL done: held-out %s pass@1 %.3f -> %.3f, reward %.3f -> %.3f; policy at %s", cfg.eval.family,
                 acc_start, acc_end, reward_start, reward_end, model_uri)
        return StageOutput(outputs=outputs, metrics={k: float(v) for k, v in metrics.items()},
                           extra={"summary": summary})

    def rejection_sample(self) -> tuple[str, dict[str, Any]]:
        from components.sft.traces import publish_traces, rejection_sample

        r = self.cfg.rejection
        traces, stats = rejection_sample(self.model, self.tokenizer, self.rejection_problems, n_samples=r.n_samples,
                                         temperature=r.temperature, top_p=r.top_p,
                                         max_new_tokens=self.cfg.rewards.max_completion_len, seed=r.seed)
        uri = publish_traces(traces, stats, storage.join_uri(self.ctx.output_uri, TRACES_DIR),
                             workdir=self.ctx.workdir, meta={"lineage": self.ctx.lineage})
        self.log("rejection sampling: kept %d traces of %d samples (%d problems) at %s", stats["kept"],
                 stats["samples"], stats["problems"], uri)
        return uri, stats


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1, default=str) + "\n"
