"""GRPO side by side: moeflow's trainer and TRL's `GRPOTrainer` on the same base, prompts, rewards and
hyperparameters, both scored by moeflow's evaluator (issue 14 item 2).

    .venv/bin/pip install -c constraints.txt 'trl==1.16.0'     # optional bench dependency, never a runtime one
    python -m bench.trl_grpo --model <moeflow model dir> --dataset <prepared dataset dir> --seeds 0 1

The RL settings are the `rl` section of `--config` (default the tiny preset) with `--set key=value`
overrides, so the two sides share:
- the base: the moeflow model, and for TRL its `export_hf` directory (`DeepseekV3ForCausalLM`, the same
  logits); prompts as moeflow's RL stage builds them (`[bos] + prompt`, asserted identical token for token);
- the prompt stream: moeflow's `PromptStream` order over its 2,000 problems (held-out ones excluded); TRL
  reads it in that order (`shuffle_dataset=False`), `prompts_per_step` prompts a step;
- the rewards: moeflow's `compute_rewards` (accuracy, format, steps, overlong) on the decoded completions;
- generation: `group_size` samples a prompt at `temperature`, stopping at eos or `</answer>`, at most
  `max_completion_len` tokens; truncated completions masked; the loss: DAPO token mean, clip
  [1 - eps_low, 1 + eps_high], beta 0, group-scaled advantages, one update per rollout (mu 1);
- the optimizer: moeflow's AdamW (`make_optimizer`) and LR schedule (`build_scheduler`) passed to TRL, and
  TRL's `max_grad_norm` set to the config's `grad_clip`.

What still differs, by construction: TRL's advantage epsilon (1e-4; moeflow 1e-6), TRL's importance ratio
(exactly 1 at mu = 1; moeflow's uses the sampler's log-probs, equal to ~1e-9), the sampling streams (TRL
samples with Hugging Face `generate`), and TRL's implementation of the model (transformers' eager
DeepseekV3, fp32). Each side's held-out pass@1 / pass@8 (moeflow's `evaluate`, `rl.eval` settings, the
same seed) is measured before and after; the table goes to `bench/results/trl_grpo_cpu.md` and the raw
records to `trl_grpo_cpu.json` (a rerun skips the (side, seed) pairs it already has unless `--fresh`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def rl_config(config: Path, sets: list[str]):
    import yaml

    from components.rl.config import RLConfig
    from infra.configfile import apply_overrides

    data = yaml.safe_load(config.read_text())
    section = data.get("rl", data)
    return RLConfig.model_validate(apply_overrides(dict(section), sets))


def heldout_eval(model, tokenizer, heldout, cfg) -> dict[str, float]:
    from components.scoring.evaluate import evaluate

    e = cfg.eval
    res = evaluate(model, tokenizer, heldout, n_samples=e.n_samples, temperature=e.temperature, top_p=e.top_p,
                   max_new_tokens=e.max_new_tokens, seed=e.seed, greedy=False, k_values=(1, e.n_samples),
                   batch_size=e.batch_size, keep_samples=False)
    m = res["metrics"]
    return {"pass@1": m["pass@1"], f"pass@{e.n_samples}": m[f"pass@{e.n_samples}"]}


class Setup:
    """What both sides share: the config, base, tokenizer, prompt pool, held-out problems."""

    def __init__(self, model_dir: Path, dataset_dir: Path, cfg):
        from components.dataset.format import eval_problem_ids, load_tokenizer
        from components.model.tokens import encode_prompts
        from components.refs import checkpoint as ckpt
        from components.rl.runner import heldout_problems, prompt_pool, with_dataset_knobs

        self.model_dir, self.dataset_dir = model_dir, dataset_dir
        self.cfg = with_dataset_knobs(cfg, dataset_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.heldout = heldout_problems(dataset_dir, self.cfg.eval.family, self.cfg.eval.n_problems)
        self.pool = prompt_pool(self.cfg, eval_problem_ids(dataset_dir))
        _, self.model_cfg = ckpt.load_model(model_dir)
        self.prompt_ids = encode_prompts(self.tokenizer, [p.prompt for p in self.pool], self.model_cfg.bos_token_id)

    def base(self):
        from components.refs import checkpoint as ckpt
        from components.rl.sampler import warm_rope

        model, _ = ckpt.load_model(self.model_dir)
        warm_rope(model)
        return model

    def stream_order(self, seed: int, steps: int) -> list[int]:
        """Pool indices in the order moeflow's trainer draws them (cursor 0 onwards)."""
        from components.rl.trainer import PromptStream

        return PromptStream(len(self.pool), seed).take(0, steps * self.cfg.grpo.prompts_per_step)


# ------------------------------------------------------------------------------------------- moeflow
def run_moeflow(s: Setup, seed: int, log_every: int) -> dict[str, Any]:
    from components.rl.trainer import GRPOTrainer

    model = s.base()
    before = heldout_eval(model, s.tokenizer, s.heldout, s.cfg)
    trainer = GRPOTrainer(model, s.tokenizer, s.pool, s.cfg.grpo, s.cfg.rewards, seed=seed)
    t0 = time.perf_counter()
    step_s, rewards = [], []
    while trainer.step < s.cfg.grpo.steps:
        m = trainer.train_step()
        step_s.append(m["time/step_s"])
        rewards.append(m["reward/total"])
        if trainer.step % log_every == 0:
            print(f"  moeflow seed {seed} step {trainer.step}: reward {m['reward/total']:.3f} "
                  f"acc {m['reward/accuracy']:.3f} ent {m.get('entropy', float('nan')):.3f}", flush=True)
    seconds = time.perf_counter() - t0
    trainer.close()
    model.eval()
    after = heldout_eval(model, s.tokenizer, s.heldout, s.cfg)
    return {"before": before, "after": after, "train_seconds": seconds,
            "step_s_median": statistics.median(step_s), "reward_first5": statistics.mean(rewards[:5]),
            "reward_last5": statistics.mean(rewards[-5:])}


# ----------------------------------------------------------------------------------------------- TRL
def build_trl(s: Setup, seed: int, workdir: Path, callbacks=(), log_every: int = 25, evaluate: bool = True):
    """TRL's `GRPOTrainer` on the exported base with moeflow's prompts, rewards, optimizer and schedule (see
    the module doc); -> (trainer, the base's held-out pass@k, or None without `evaluate`)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from components.common.schedule import build_scheduler
    from components.model.hf import export_hf
    from components.model.tokens import token_id
    from components.rl.rewards import compute_rewards
    from components.sft.sft import make_optimizer

    cfg, g = s.cfg, s.cfg.grpo
    base = s.base()
    before = heldout_eval(base, s.tokenizer, s.heldout, cfg) if evaluate else None
    hf_dir = workdir / f"hf-base-{seed}"
    export_hf(base, hf_dir, tokenizer_dir=s.model_dir)
    del base
    tok = PreTrainedTokenizerFast(tokenizer_file=str(s.model_dir / "tokenizer.json"), bos_token="<|bos|>",
                                  eos_token="<|eos|>", pad_token="<|pad|>", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    stop = token_id(s.tokenizer, "</answer>")
    model.generation_config.eos_token_id = [tok.eos_token_id] + ([stop] if stop is not None else [])

    order = s.stream_order(seed, g.steps)
    rows = [{"prompt": s.pool[i].prompt, "idx": i} for i in order]  # the tokenizer adds the bos
    for r, i in zip(rows[:64], order[:64], strict=True):  # the same prompt tokens as moeflow's trainer
        got = tok(r["prompt"], add_special_tokens=True)["input_ids"]
        if got != s.prompt_ids[i]:
            raise SystemExit(f"TRL's prompt tokens differ from moeflow's for problem {i}: {got} vs {s.prompt_ids[i]}")
    dataset = Dataset.from_list(rows)

    def reward(prompts, completions, completion_ids, idx, **_):
        problems = [s.pool[i] for i in idx]
        truncated = [len(ids) >= cfg.rewards.max_completion_len and (not ids or ids[-1] not in
                     model.generation_config.eos_token_id) for ids in completion_ids]
        rb = compute_rewards(problems, completions, [len(c) for c in completion_ids], truncated, cfg.rewards)
        return [float(x) for x in rb.total]

    optimizer = make_optimizer(model, g.optim)
    scheduler = build_scheduler(optimizer, g.steps, g.schedule)
    B = g.prompts_per_step * g.group_size
    args = GRPOConfig(
        output_dir=str(workdir / f"trl-{seed}"), max_steps=g.steps, per_device_train_batch_size=B,
        gradient_accumulation_steps=1, num_generations=g.group_size,
        max_completion_length=cfg.rewards.max_completion_len,
        temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, beta=g.beta, epsilon=g.eps_low,
        epsilon_high=g.eps_high, loss_type=g.aggregation, scale_rewards=g.advantage_scale,
        mask_truncated_completions=g.mask_truncated, num_iterations=g.mu, shuffle_dataset=False,
        max_grad_norm=g.optim.grad_clip, seed=seed, data_seed=seed, use_cpu=True, bf16=False, fp16=False,
        report_to=[], save_strategy="no", logging_steps=log_every, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tok, optimizers=(optimizer, scheduler), callbacks=list(callbacks))
    return trainer, before


def run_trl(s: Setup, seed: int, log_every: int, workdir: Path) -> dict[str, Any]:
    from transformers import TrainerCallback

    from components.model.hf import load_pretrained
    from components.rl.sampler import warm_rope

    step_times: list[float] = []
    log_rows: list[dict[str, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

        def on_log(self, _args, state, _control, logs=None, **k):
            if logs and "reward" in logs:
                log_rows.append({"step": state.global_step, "reward": logs["reward"]})
                print(f"  trl seed {seed} step {state.global_step}: reward {logs['reward']:.3f}", flush=True)

    trainer, before = build_trl(s, seed, workdir, callbacks=[Timer()], log_every=log_every)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    out = workdir / f"hf-trained-{seed}"
    trainer.model.save_pretrained(out)
    trained = load_pretrained(out)
    warm_rope(trained)
    after = heldout_eval(trained, s.tokenizer, s.heldout, s.cfg)
    rewards = [r["reward"] for r in log_rows]
    return {"before": before, "after": after, "train_seconds": seconds,
            "step_s_median": statistics.median(step_times) if step_times else None,
            "reward_first_log": rewards[0] if rewards else None, "reward_last_log": rewards[-1] if rewards else None}


# ------------------------------------------------------------------------------------- update check
def check_update(s: Setup, seed: int, workdir: Path) -> dict[str, Any]:
    """The same rollout through both trainers' update: does TRL compute the gradient moeflow does?

    One moeflow rollout (its prompts, completions, rewards and group advantages). moeflow: `GRPOTrainer.update`
    with the optimizer step left out and no gradient clipping, so the parameters' .grad is the loss's
    gradient. TRL: `GRPOTrainer._compute_loss` (the loss its `train` backpropagates) on the same batch in
    its own layout (left-padded prompts, right-padded completions, truncated ones masked, DAPO's
    `num_items_in_batch`), through transformers' DeepseekV3 loaded from the same base. -> both losses and the
    gradients' difference (relative L2 over every parameter, the largest per tensor, cosine)."""
    import torch

    from components.model.hf import hf_counterpart
    from components.rl.trainer import GRPOTrainer

    cfg, g = s.cfg, s.cfg.grpo
    g1 = g.model_copy(update={"minibatches": 1, "optim": g.optim.model_copy(update={"grad_clip": 0.0})})
    model = s.base()
    ours = GRPOTrainer(model, s.tokenizer, s.pool, g1, cfg.rewards, seed=seed)
    ro = ours.rollout()
    ours.optimizer.step = lambda *a, **k: None  # keep the gradient, leave the weights
    loss_ours = ours.update(ro)["loss"]

    trl, _ = build_trl(s, seed, workdir, evaluate=False)
    hf, pad, G = trl.model, trl._tokenizer.pad_token_id, g.group_size
    hf.train()
    prompts = [ro.prompt_ids[b // G] for b in range(len(ro.results))]
    Lp, Lc = max(map(len, prompts)), max(len(r.tokens) for r in ro.results)
    prompt_ids = torch.tensor([[pad] * (Lp - len(p)) + list(p) for p in prompts])
    prompt_mask = torch.tensor([[0] * (Lp - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([r.tokens + [pad] * (Lc - len(r.tokens)) for r in ro.results])
    completion_mask = torch.tensor([[int(not (g.mask_truncated and r.finish_reason == "length"))] * len(r.tokens)
                                    + [0] * (Lc - len(r.tokens)) for r in ro.results])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": ro.advantages_B.clone(),
              "num_items_in_batch": completion_mask.sum().float()}
    trl.current_gradient_accumulation_steps = 1
    hf.zero_grad(set_to_none=True)
    loss_trl = trl._compute_loss(hf, inputs)
    loss_trl.backward()

    hf_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in hf.named_parameters()}
    sq_diff = sq_ref = dot = sq_ours = 0.0
    worst, worst_name, seen = 0.0, "", set()
    for name, p in model.named_parameters():
        if name.startswith("mtp."):  # not in the HF export, not in the RL loss
            continue
        hf_name, ref = hf_counterpart(name, hf_grads)
        seen.add(hf_name)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        d = (got - ref).double()
        sq_diff += float((d * d).sum())
        sq_ref += float((ref.double() ** 2).sum())
        sq_ours += float((got.double() ** 2).sum())
        dot += float((got.double() * ref.double()).sum())
        rel = float(d.abs().max() / ref.abs().max().clamp(min=1e-12))
        if rel > worst:
            worst, worst_name = rel, name
    missing = sorted(set(hf_grads) - seen)
    return {"loss_moeflow": float(loss_ours), "loss_trl": float(loss_trl.detach()),
            "grad_rel_l2": (sq_diff / max(sq_ref, 1e-300)) ** 0.5,
            "grad_cosine": dot / max((sq_ref * sq_ours) ** 0.5, 1e-300),
            "grad_worst_tensor_rel": worst, "grad_worst_tensor": worst_name, "unmatched_trl_params": missing,
            "sequences": len(ro.results), "trained_sequences": int((ro.advantages_B != 0).sum()),
            "loss_tokens": int(completion_mask.sum())}


# ------------------------------------------------------------------------------------------- report
def markdown(records: list[dict[str, Any]], header: str) -> str:
    k = next(iter(records[0]["after"]))  # pass@1
    n = [key for key in records[0]["after"] if key != k][0]
    lines = [header, "", f"| side | seed | base {k} | after {k} | gain (points) | base {n} | after {n} | "
             "train s | s/step (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['side']} | {r['seed']} | {100 * b[k]:.1f} | {100 * a[k]:.1f} "
                     f"| {100 * (a[k] - b[k]):+.1f} | {100 * b[n]:.1f} | {100 * a[n]:.1f} | {r['train_seconds']:.0f} "
                     f"| {r['step_s_median'] or 0:.2f} |")
    lines += ["", "| side | runs | gain mean ± sd | worst gain | median s/step |", "|---|---|---|---|---|"]
    for side in ("moeflow", "trl"):
        rs = [r for r in records if r["side"] == side]
        if not rs:
            continue
        gains = [100 * (r["after"][k] - r["before"][k]) for r in rs]
        sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
        lines.append(f"| {side} | {len(rs)} | {statistics.mean(gains):+.1f} ± {sd:.1f} | {min(gains):+.1f} | "
                     f"{statistics.median(r['step_s_median'] or 0 for r in rs):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trl_grpo", description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a moeflow model directory (e.g. pretrain's model)")
    p.add_argument("--dataset", type=Path, required=True, help="the prepared dataset directory")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the rl section (both sides), e.g. grpo.steps=100")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--sides", nargs="+", default=["moeflow", "trl"], choices=["moeflow", "trl"])
    p.add_argument("--tag", default="trl_grpo_cpu", help="results file stem under bench/results/")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--fresh", action="store_true", help="drop the records a previous run left")
    p.add_argument("--check-update", action="store_true",
                   help="only compare the two trainers' loss and gradient on one moeflow rollout per seed (seconds)")
    a = p.parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        print("error: TRL is an optional bench dependency: .venv/bin/pip install -c constraints.txt 'trl==1.16.0'",
              file=sys.stderr)
        return 2
    import torch

    from bench.science import machine_name

    torch.set_num_threads(a.threads)
    cfg = rl_config(a.config, a.sets)
    s = Setup(a.model, a.dataset, cfg)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.check_update:
        with tempfile.TemporaryDirectory() as tmp:
            checks = [{"seed": seed, **check_update(s, seed, Path(tmp))} for seed in a.seeds]
        lines = [f"# The same rollout through both updates: moeflow vs TRL {trl.__version__}\n",
                 f"Machine: {machine_name()}. Command: `python -m bench.trl_grpo --check-update --seeds "
                 f"{' '.join(map(str, a.seeds))}` (`check_update`'s docstring says what is compared).\n",
                 "| seed | sequences (with signal) | loss tokens | loss moeflow | loss TRL | gradient rel. L2 diff "
                 "| cosine | worst tensor (max rel. diff) |", "|---|---|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['seed']} | {c['sequences']} ({c['trained_sequences']}) | {c['loss_tokens']} "
                         f"| {c['loss_moeflow']:.6g} | {c['loss_trl']:.6g} | {c['grad_rel_l2']:.2e} "
                         f"| {c['grad_cosine']:.8f} | {c['grad_worst_tensor']} ({c['grad_worst_tensor_rel']:.2e}) |")
            if c["unmatched_trl_params"]:
                lines.append(f"\nTRL parameters with no moeflow counterpart: {c['unmatched_trl_params']}")
        (RESULTS / f"{a.tag}_update.md").write_text("\n".join(lines) + "\n")
        (RESULTS / f"{a.tag}_update.json").write_text(json.dumps(checks, indent=1) + "\n")
        print("\n".join(lines))
        return 0
    raw = RESULTS / f"{a.tag}.json"
    records: list[dict[str, Any]] = [] if a.fresh or not raw.exists() else json.loads(raw.read_text())["records"]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for side in a.sides:
                if any(r["side"] == side and r["seed"] == seed for r in records):
                    continue
                print(f"{side} seed {seed}: {cfg.grpo.steps} steps", flush=True)
                if side == "moeflow":
                    rec = run_moeflow(s, seed, a.log_every)
                else:
                    rec = run_trl(s, seed, a.log_every, Path(tmp))
                records.append({"side": side, "seed": seed, **rec})
                config = a.config.relative_to(REPO) if a.config.is_relative_to(REPO) else a.config
                raw.write_text(json.dumps({"sets": a.sets, "config": str(config), "records": records}, indent=1) + "\n")
                print(f"{side} seed {seed}: {rec['before']} -> {rec['after']} in {rec['train_seconds']:.0f}s",
                      flush=True)
    g = cfg.grpo
    header = (f"# GRPO: moeflow vs TRL {trl.__version__} on the same base, prompts, rewards and settings\n\n"
              f"Machine: {machine_name()}, {a.threads} threads. Command: `python -m bench.trl_grpo --model <pretrain "
              f"model> --dataset <prep dataset> --seeds {' '.join(map(str, a.seeds))}"
              + "".join(f" --set {x}" for x in a.sets) + f"` (see its docstring for what is shared). {g.steps} steps x "
              f"{g.prompts_per_step} prompts x {g.group_size} samples, T {g.temperature}, lr {g.optim.lr}; held-out: "
              f"{cfg.eval.n_problems} problems x {cfg.eval.n_samples} samples at T {cfg.eval.temperature}, moeflow's "
              "evaluator for both sides.")
    (RESULTS / f"{a.tag}.md").write_text(markdown(records, header))
    print(markdown(records, header))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
