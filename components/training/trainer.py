"""The pretraining loop: `Trainer.train()` is the whole story, `train_step()` one optimizer step.

Per step: each rank runs its micro-batches (bf16 autocast on GPU, fp32 on CPU), backward on the loss
`lm + (lambda/D) sum MTP + sequence aux` divided by the accumulation count (gradients are synchronised
on the last micro-batch only); the global gradient norm is clipped; a non-finite loss or norm skips the
update (up to `guards.max_skipped_steps`, else the run stops with `TrainingDiverged`, exit code 4, keeping
the last good checkpoint); AdamW steps, the schedule steps, and the routers' balancing biases move
against the expert loads counted over the whole global batch (all ranks). Validation every
`eval.every` steps, a checkpoint every `checkpoint.every` steps and at the end, metrics to MLflow on
rank 0. A restarted job finds its newest complete checkpoint under the stage's output and resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import time
import warnings
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from components.common.schedule import build_scheduler
from components.common.system import available_cores, duration
from components.dataset.format import load_dataset_meta
from components.model.arithmetic import model_info
from components.model.config import ModelConfig
from components.refs import checkpoint as ckpt
from infra import storage
from infra.contract import ConfigError, StageContext, TrainingDiverged

from . import distributed as D
from .config import PretrainConfig
from .data import TrainBatches, open_dataset, val_batches
from .metrics import (
    device_peak,
    efficiency_ledger,
    expert_load_stats,
    format_ledger,
    load_heatmap_figure,
    loss_curve_figure,
    moe_layer_labels,
)

log = logging.getLogger("moeflow.pretrain")


def resolve_model_config(cfg: PretrainConfig, meta: dict[str, Any]) -> ModelConfig:
    """The model config with the dataset's vocabulary and special tokens when `vocab_from_dataset`."""
    mcfg = cfg.model
    vocab = int(meta["vocab_size"])
    if cfg.vocab_from_dataset:
        special = meta.get("special_tokens", {})
        updates: dict[str, Any] = {"vocab_size": vocab}
        for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "pad")):
            if name in special:
                updates[key] = int(special[name])
        mcfg = ModelConfig.model_validate({**mcfg.model_dump(), **updates})
    elif mcfg.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size ({mcfg.vocab_size}) is smaller than the dataset's vocabulary ({vocab}); "
            "raise it or set vocab_from_dataset: true"
        )
    seq_len = cfg.seq_len or int(meta["seq_len"])
    if seq_len > int(meta["seq_len"]):
        raise ConfigError(f"seq_len ({seq_len}) exceeds the dataset's seq_len ({meta['seq_len']}); lower seq_len")
    if seq_len > mcfg.max_position_embeddings:
        raise ConfigError(
            f"the dataset's rows hold {seq_len} tokens but model.max_position_embeddings is "
            f"{mcfg.max_position_embeddings}; raise it or set seq_len"
        )
    return mcfg


class Trainer:
    """One pretraining run inside a stage job (one instance per rank)."""

    def __init__(self, cfg: PretrainConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.step = 0
        self.skipped = 0
        self.resumed_from: int | None = None
        self.history: dict[str, list] = {"step": [], "loss": [], "lr": [], "val_step": [], "val_loss": []}
        self.train_seconds = 0.0  # wall time of the training loop, summed over restarts
        self.compute_tokens = 0  # tokens trained and the seconds their steps took, summed over restarts
        self.compute_s = 0.0
        self.load_sum: torch.Tensor | None = None  # expert loads summed after the load warm-up
        self.max_mean_sum = 0.0
        self.max_mean_n = 0
        self.last_metrics: dict[str, float] = {}
        self._window = {"tokens": 0, "seconds": 0.0}
        self._saved_step = -1
        self._session_steps = 0
        self._last_load: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None  # newest step's loads
        self.a2a_bytes = 0  # bytes this rank sent in expert-parallel all-to-alls, this session's steps

    # ------------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Set up, resume, run the remaining steps, finish; returns outputs and headline metrics."""
        cfg = self.cfg
        self._det_before = torch.are_deterministic_algorithms_enabled()
        self._threads_before = torch.get_num_threads()
        try:
            self.setup()
            self.restore()
            t_loop = time.perf_counter()
            while self.step < cfg.steps:
                self.step += 1
                metrics = self.train_step()
                self.log_step(metrics)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps:
                    self.validate()
                if self.step % cfg.checkpoint.every == 0 or self.step == cfg.steps:
                    self.train_seconds += time.perf_counter() - t_loop
                    t_loop = time.perf_counter()
                    self.save_checkpoint()
            self.train_seconds += time.perf_counter() - t_loop
            return self.finish()
        finally:
            self.close()

    # ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.env = D.init(cfg.device, cfg.parallel.backend, ctx.rank, ctx.world_size, ctx.local_rank)
        env = self.env
        if env.device.type == "cpu":
            per_node = max(1, min(ctx.world_size, cfg.resources.procs_per_node))
            torch.set_num_threads(cfg.threads or max(1, available_cores() // per_node))
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=env.device.type == "cuda")
            if env.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        try:
            self.accum = cfg.grad_accum(env.world_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        if self.bf16 and env.device.type == "cpu" and cfg.precision == "bf16":
            log.warning("precision bf16 on CPU: autocast to bf16 is slow on most CPUs")
        self.peak_flops, self.peak_source = device_peak(env.device, bf16=self.bf16,
                                                        override_tflops=cfg.metrics.peak_tflops)
        self.device_name = (torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "CPU")

        self.data_dir = open_dataset(cfg.dataset, local_rank=env.local_rank, barrier=D.barrier)
        meta = load_dataset_meta(self.data_dir)
        self.model_cfg = resolve_model_config(cfg, meta)
        self.batches = TrainBatches(self.data_dir, global_batch=cfg.batch_size, micro_batch=cfg.micro_batch_size,
                                    rank=env.rank, world_size=env.world_size, seed=cfg.seed, seq_len=cfg.seq_len)
        self.seq_len = self.batches.seq_len
        self.val = val_batches(self.data_dir, max_rows=cfg.eval.max_rows, micro_batch=cfg.micro_batch_size,
                               rank=env.rank, world_size=env.world_size, seq_len=cfg.seq_len)

        from components.model.model import Transformer

        torch.manual_seed(cfg.seed)
        with torch.device(env.device):  # built where it trains: no full-size host copy per rank
            self.model = Transformer(self.model_cfg)
        try:
            self.ep = D.apply_expert_parallel(self.model, env, cfg.parallel.ep)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if cfg.parallel.ep > cfg.resources.procs_per_node and env.is_main:
            # EP groups are consecutive ranks and torchrun numbers ranks node by node
            log.warning("parallel.ep (%d) exceeds resources.procs_per_node (%d): the experts' all-to-alls "
                        "cross nodes", cfg.parallel.ep, cfg.resources.procs_per_node)
        if cfg.compile:  # compute_loss as one graph (FSDP2's hooks and EP's all-to-all splits may break it)
            from components.model.compile import compile_model

            compile_model(self.model, fullgraph=not (env.distributed and (cfg.parallel.strategy == "fsdp"
                                                                         or self.ep is not None)))
        self.module = D.parallelize(self.model, env, cfg.parallel.strategy, ep=self.ep,
                                    reshard_after_forward=cfg.parallel.reshard_after_forward)
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas, eps=o.eps,
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.steps, cfg.schedule)
        info = model_info(self.model_cfg, seq_len=self.seq_len)
        self.info = info
        key = "flops_per_token_with_mtp" if self.model_cfg.mtp_depth else "flops_per_token"
        self.flops_per_token = float(info[key])
        self.params = self.model.param_counts()
        self.layer_labels = moe_layer_labels(self.model)
        self.load_warmup = (cfg.metrics.load_warmup_steps if cfg.metrics.load_warmup_steps is not None
                            else cfg.schedule.warmup_steps)
        if cfg.schedule.warmup_steps > cfg.steps:
            log.warning("schedule.warmup_steps (%d) exceeds steps (%d): the peak learning rate is never reached",
                        cfg.schedule.warmup_steps, cfg.steps)
        self.bias_stop_step = math.floor(cfg.balance.stop_fraction * cfg.steps)
        self.ctx.tracker.log_params({
            "derived.grad_accum": self.accum, "derived.world_size": env.world_size,
            "derived.tokens_per_step": self.batches.tokens_per_step, "derived.device": self.device_name,
            "derived.precision": "bf16" if self.bf16 else "fp32", "derived.total_params": self.params["total"],
            "derived.active_params": self.params["active"], "derived.flops_per_token": self.flops_per_token,
            "derived.peak_flops": self.peak_flops, "derived.vocab_size": self.model_cfg.vocab_size,
        })
        if not env.is_main:
            return
        log.info("model: %.2fM parameters (%.2fM active per token, %.2fM MTP), %d MoE layers x %d experts",
                 self.params["total"] / 1e6, self.params["active"] / 1e6, self.params["mtp"] / 1e6,
                 len(self.layer_labels), self.model_cfg.n_routed_experts)
        log.info("training: %d steps x %d sequences x %d tokens on %d x %s (%s, grad accumulation %d); "
                 "peak %.3g TFLOP/s per device (%s)", cfg.steps, cfg.batch_size, self.seq_len,
                 env.world_size, self.device_name, "bf16" if self.bf16 else "fp32", self.accum,
                 self.peak_flops / 1e12, self.peak_source)

    def close(self) -> None:
        """Undo process-wide settings and leave the process group (runs after errors too)."""
        torch.use_deterministic_algorithms(self._det_before)
        torch.set_num_threads(self._threads_before)
        D.destroy()

    # ------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches of the next global batch."""
        cfg, env = self.cfg, self.env
        t0 = time.perf_counter()
        self.model.train()
        for _, experts in D.expert_modules(self.model):  # validation's exchanges are not this step's
            experts.a2a_bytes = 0
        micro = self.batches.next_step()
        # loss, lm, mtp, aux summed over micro-batches; kept on the device (one sync per step; NCCL
        # collectives need device tensors)
        sums = torch.zeros(4, dtype=torch.float64, device=env.device)
        for i, (inputs, labels) in enumerate(micro):
            inputs, labels = inputs.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
            with D.no_grad_sync(self.module, skip=i < len(micro) - 1):
                with self._autocast():  # autocast covers the forward only, as PyTorch recommends
                    parts = self.module(inputs, labels)
                (parts[0] / len(micro)).backward()
            sums += torch.stack([p.detach().double() for p in parts])
        sums = D.all_reduce(sums / len(micro), "avg").cpu()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        if self.ep is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        else:
            D.sync_expert_grads(self.model, self.ep, env.world_size, cfg.parallel.strategy)
            grad_norm = D.clip_grad_norm(self.model, clip, self.ep, cfg.parallel.strategy)
        grad_norm = float(D.local_tensor(grad_norm))
        a2a = 0
        for _, experts in D.expert_modules(self.model):
            a2a, experts.a2a_bytes = a2a + experts.a2a_bytes, 0
        counts = D.all_reduce(self.model.expert_counts().to(torch.int64)).cpu()
        lr = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(float(sums[0])) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if cfg.balance.bias_update and self.step <= self.bias_stop_step:
                self.model.update_expert_bias(counts.to(env.device))
            else:
                self.model.reset_expert_counts()
        else:
            self.on_nonfinite(float(sums[0]), grad_norm)
            self.model.reset_expert_counts()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first update is intended; LambdaLR is stateless per step
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        seconds = time.perf_counter() - t0
        tokens = self.batches.tokens_per_step
        if self._session_steps:  # the first step of a process warms up allocators and caches: not timed
            self.compute_tokens += tokens
            self.compute_s += seconds
        self._session_steps += 1
        self.a2a_bytes += a2a
        self._window["tokens"] += tokens
        self._window["seconds"] += seconds
        metrics = {"loss": float(sums[1]), "loss_total": float(sums[0]), "mtp_loss": float(sums[2]),
                   "aux_loss": float(sums[3]), "grad_norm": grad_norm, "lr": lr, "skipped": float(not finite),
                   "epoch": self.batches.sampler.epoch}
        if self.ep is not None:
            metrics["a2a_bytes"] = float(a2a)  # sent by this rank (rank 0's is logged), forward + backward
        if finite and counts.numel():
            self.record_load(counts, metrics)
        return metrics

    def on_nonfinite(self, loss: float, grad_norm: float) -> None:
        self.skipped += 1
        what = f"step {self.step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} " \
               f"(loss {loss}, grad norm {grad_norm})"
        if self.skipped > self.cfg.guards.max_skipped_steps:
            last = ckpt.latest_checkpoint(self.ctx.output_uri)
            keep = f"the last good checkpoint is {last[1]} (step {last[0]})" if last else "no checkpoint was saved"
            raise TrainingDiverged(
                f"training diverged: {what}; {self.skipped} non-finite step(s), guards.max_skipped_steps is "
                f"{self.cfg.guards.max_skipped_steps}. Stopped without saving; {keep}. Lower optim.lr, "
                "raise schedule.warmup_steps or lower optim.grad_clip"
            )
        log.warning("%s: update skipped (%d of %d allowed)", what, self.skipped, self.cfg.guards.max_skipped_steps)

    def record_load(self, counts: torch.Tensor, metrics: dict[str, float]) -> None:
        stats = expert_load_stats(counts)
        metrics["max_mean_load"] = float(stats["max_mean"].mean())
        metrics["load_entropy"] = float(stats["entropy"].mean())
        self._last_load = (stats, counts)
        if self.step > self.load_warmup:
            self.load_sum = counts.double() if self.load_sum is None else self.load_sum + counts.double()
            self.max_mean_sum += metrics["max_mean_load"]
            self.max_mean_n += 1

    # ------------------------------------------------------------------------------------------------
    def log_step(self, m: dict[str, float]) -> None:
        cfg = self.cfg
        self.history["step"].append(self.step)
        self.history["loss"].append(m["loss"])
        self.history["lr"].append(m["lr"])
        self.last_metrics = m
        if self.step % cfg.metrics.log_every and self.step != cfg.steps and self.step != 1:
            return
        w = self._window
        tps = w["tokens"] / w["seconds"] if w["seconds"] else 0.0
        self._window = {"tokens": 0, "seconds": 0.0}
        mfu = tps * self.flops_per_token / (self.env.world_size * self.peak_flops)
        out = {**m, "tokens_per_s": tps, "mfu": mfu, "tokens": self.step * self.batches.tokens_per_step}
        if self._last_load is not None:
            stats, _ = self._last_load
            for i, label in enumerate(self.layer_labels):
                out[f"expert_load/max_mean/{label}"] = float(stats["max_mean"][i])
                out[f"expert_load/entropy/{label}"] = float(stats["entropy"][i])
            for label, moe in zip(self.layer_labels, self.model.moe_layers(), strict=True):
                out[f"expert_bias_norm/{label}"] = float(moe.gate.e_score_correction_bias.norm())
        self.ctx.tracker.log_metrics(out, step=self.step)
        if self.env.is_main:
            frac = self.step / cfg.steps
            bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
            rate = self.compute_s / max(self.compute_tokens, 1)
            eta = rate * (cfg.steps - self.step) * self.batches.tokens_per_step
            load = f" | load max/mean {m['max_mean_load']:.2f}" if "max_mean_load" in m else ""
            log.info("step %d/%d [%s] %3.0f%% | loss %.4f | lr %.2e | gnorm %.3f | %s tok/s | mfu %.2f%%%s | "
                     "eta %s", self.step, cfg.steps, bar, 100 * frac, m["loss"], m["lr"], m["grad_norm"],
                     f"{tps:,.0f}", 100 * mfu, load, duration(eta))

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean next-token loss over the validation rows (all ranks); logged as `val_loss`."""
        if not self.val:
            return None
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for inputs, labels in self.val:
            inputs, labels = inputs.to(self.env.device), labels.to(self.env.device)
            with self._autocast():
                lm = self.module(inputs, labels)[1]
            sums[0] += lm.detach().double() * labels.numel()
            sums[1] += labels.numel()
        self.model.train()
        sums = D.all_reduce(sums).cpu()
        val = float(sums[0] / sums[1])
        self.history["val_step"].append(self.step)
        self.history["val_loss"].append(val)
        self.ctx.tracker.log_metrics({"val_loss": val}, step=self.step)
        if self.env.is_main:
            log.info("step %d: validation loss %.4f", self.step, val)
        return val

    # ------------------------------------------------------------------------------------------------
    def _full_states(self, optimizer: bool = True) -> tuple[dict, dict]:
        """The full (unsharded, all experts) model and optimizer state dicts on rank 0 (empty elsewhere
        when distributed); every rank must call it."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.env.distributed)
        model_state = get_model_state_dict(self.model, options=opts)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=opts) if optimizer else {}
        D.gather_expert_state(self.model, self.optimizer if optimizer else None, self.ep, model_state,
                              optim_state, keep=self.env.is_main)
        return model_state, optim_state

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step, "data": self.batches.state_dict(), "scheduler": self.scheduler.state_dict(),
            "skipped": self.skipped, "train_seconds": self.train_seconds,
            "compute_tokens": self.compute_tokens, "compute_s": self.compute_s,
            "load_sum": self.load_sum, "max_mean_sum": self.max_mean_sum, "max_mean_n": self.max_mean_n,
            "world_size": self.env.world_size, "ep": self.cfg.parallel.ep,
        }

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "steps": self.cfg.steps, "tokens": self.step * self.batches.tokens_per_step,
                "world_size": self.env.world_size, "skipped": self.skipped, "train_seconds": self.train_seconds,
                "dataset": self.cfg.dataset, "last_metrics": self.last_metrics, "history": self.history}

    def save_checkpoint(self) -> str | None:
        """Save a checkpoint of the current step on rank 0 (all ranks gather), publish it, prune old ones."""
        if self._saved_step == self.step:
            return None
        t0 = time.perf_counter()
        model_state, optim_state = self._full_states()
        rngs = D.all_gather_object(ckpt.rng_state())
        uri = None
        if self.env.is_main:
            local = self.ctx.workdir / "checkpoint-staging" / ckpt.step_name(self.step)
            state = {**self.trainer_state(), "rng": rngs}
            ckpt.write_checkpoint(local, model_state=model_state, optimizer_state=optim_state,
                                  trainer_state=state, summary=self.summary(), model_cfg=self.model_cfg)
            uri = ckpt.publish_checkpoint(local, self.ctx.output_uri, self.step,
                                          meta={"lineage": {"stage": "pretrain", "key": self.ctx.lineage.get("key")}})
            deleted = ckpt.prune_checkpoints(self.ctx.output_uri, self.cfg.checkpoint.keep)
            log.info("step %d: checkpoint %s (%.1fs)%s", self.step, uri, time.perf_counter() - t0,
                     f"; pruned {len(deleted)}" if deleted else "")
        D.barrier()
        self._saved_step = self.step
        return uri

    def restore(self) -> None:
        """Resume from the newest complete checkpoint under the stage's output, if any."""
        if not self.cfg.checkpoint.resume:
            return
        latest = D.broadcast_object(ckpt.latest_checkpoint(self.ctx.output_uri) if self.env.is_main else None)
        if latest is None:
            return
        step, uri = latest
        if self.env.local_rank == 0:
            path = ckpt.fetch_checkpoint(uri)
            D.barrier()
        else:
            D.barrier()
            path = ckpt.fetch_checkpoint(uri)
        files = ckpt.read_checkpoint(path)
        opts = StateDictOptions(full_state_dict=True)
        D.shard_expert_state(self.model, self.ep, files["model"], files["optimizer"])  # any EP size
        set_model_state_dict(self.model, {k: v.to(self.env.device) for k, v in files["model"].items()}, options=opts)
        set_optimizer_state_dict(self.model, self.optimizer, files["optimizer"], options=opts)
        st = files["trainer"]
        self.scheduler.load_state_dict(st["scheduler"])
        try:
            self.batches.load_state_dict(st["data"])
        except ValueError as exc:
            raise ConfigError(f"cannot resume from {uri}: {exc}") from None
        self.step, self.skipped = int(st["step"]), int(st["skipped"])
        self.train_seconds = float(st["train_seconds"])
        self.compute_tokens, self.compute_s = int(st["compute_tokens"]), float(st["compute_s"])
        self.load_sum = st["load_sum"]
        self.max_mean_sum, self.max_mean_n = float(st["max_mean_sum"]), int(st["max_mean_n"])
        rngs = st["rng"]
        if len(rngs) == self.env.world_size:
            ckpt.set_rng_state(rngs[self.env.rank])
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: RNG streams restart from the seed",
                        len(rngs), self.env.world_size)
            torch.manual_seed(self.cfg.seed + self.env.rank)
        self.history = files["summary"]["history"]
        self.last_metrics = files["summary"].get("last_metrics", {})
        self.model.reset_expert_counts()
        self.resumed_from = self._saved_step = self.step
        if self.env.is_main:
            log.info("resumed from %s (step %d of %d, data position %d)", uri, step, self.cfg.steps,
                     self.batches.sampler.position)

    # ------------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Final validation, plots, efficiency ledger, and the published model; returns the stage result."""
        cfg, ctx = self.cfg, self.ctx
        val = self.validate()
        self.save_checkpoint()
        model_state, _ = self._full_states(optimizer=False)
        if self.env.device.type == "cpu" and cfg.metrics.peak_tflops is None:
            # a shared CPU's attainable GEMM rate varies with its load: the best of two measurements
            again, _ = device_peak(self.env.device, bf16=self.bf16)
            self.peak_flops = max(self.peak_flops, again)
        tps = self.compute_tokens / self.compute_s if self.compute_s else 0.0
        mfu = tps * self.flops_per_token / (self.env.world_size * self.peak_flops)
        tokens = self.step * self.batches.tokens_per_step
        a2a = D.all_reduce(torch.tensor([float(self.a2a_bytes)], dtype=torch.float64, device=self.env.device))
        a2a_per_step = float(a2a.cpu()[0]) / max(self._session_steps, 1)  # all ranks, forward + backward
        ledger = efficiency_ledger(tokens=tokens, flops_per_token=self.flops_per_token,
                                   device_seconds=self.train_seconds, world_size=self.env.world_size,
                                   price_per_device_hour=cfg.metrics.price_per_device_hour, params=self.params,
                                   tokens_per_s=tps, mfu=mfu, peak_flops=self.peak_flops,
                                   peak_source=self.peak_source, device_name=self.device_name,
                                   ep=self.cfg.parallel.ep, all_to_all_bytes_per_step=a2a_per_step)
        max_mean = self.max_mean_sum / self.max_mean_n if self.max_mean_n else None
        cumulative = (float(expert_load_stats(self.load_sum)["max_mean"].mean())
                      if self.load_sum is not None else None)
        metrics = {
            "final_loss": self.history["loss"][-1] if self.history["loss"] else float("nan"),
            "tokens_per_s": tps, "mfu": mfu, "tokens": float(tokens), "steps": float(self.step),
            "device_hours": ledger["device_hours"], "cost_usd": ledger["cost_usd"], "flops": ledger["flops"],
            "total_params": float(self.params["total"]), "active_params": float(self.params["active"]),
            "skipped_steps": float(self.skipped), "train_seconds": self.train_seconds,
            "a2a_bytes_per_step": a2a_per_step,
        }
        if val is not None:
            metrics["val_loss"] = val
        if max_mean is not None:
            metrics["max_mean_load"] = max_mean
            metrics["max_mean_load_cumulative"] = cumulative
        if self.resumed_from is not None:
            metrics["resumed_from_step"] = float(self.resumed_from)
        model_uri = storage.join_uri(ctx.output_uri, ckpt.MODEL_DIR)
        if self.env.is_main:
            ctx.tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=self.step)
            ctx.tracker.log_dict(ledger, "efficiency_ledger.json")
            ctx.tracker.log_text(format_ledger(ledger), "efficiency_ledger.md")
            figures = {"plots/loss_curve.png": loss_curve_figure(self.history)}  # (selects matplotlib's Agg)
            import matplotlib.pyplot as plt
            if self.load_sum is not None:
                on = "on" if cfg.balance.bias_update else "off"
                title = f"expert load after step {self.load_warmup} (balancing {on})"
                figures["plots/expert_load_heatmap.png"] = load_heatmap_figure(self.load_sum, self.layer_labels, title)
            for name, fig in figures.items():
                ctx.tracker.log_figure(fig, name)
                plt.close(fig)
            log.info("efficiency ledger:\n%s", format_ledger(ledger))
            local = ctx.workdir / "model"
            shutil.rmtree(local, ignore_errors=True)
            training = {"steps": self.step, "tokens": tokens, "dataset": cfg.dataset,
                        "final_loss": metrics["final_loss"], "val_loss": val, "ledger": ledger,
                        "lineage": ctx.lineage}
            ckpt.save_model(model_state, self.model_cfg, local, self.data_dir, extra=training)
            storage.publish_dir(local, model_uri, meta={"kind": "model", "lineage": ctx.lineage}, overwrite=True)
            shutil.rmtree(local, ignore_errors=True)
            log.info("model published at %s", model_uri)
        D.barrier()
        return {"outputs": {"checkpoint": model_uri}, "metrics": metrics, "ledger": ledger}
