"""The `distill` stage: a teacher in; verified traces and a trained student out.

Runs inside `moeflow-job distill`:
1. traces: the teacher answers fresh training prompts (held-out evaluation problems excluded); verified,
   deduplicated answers are published as an SFT dataset at `<output>/traces/` with their statistics
   (or `traces_uri` is reused);
2. student: a smaller model (dense or MoE; at most `max_active_ratio` of the teacher's active parameters)
   trained on the traces with packing and the loss on completion tokens only, plus logit distillation
   from the teacher when `logit` is set (shared tokenizer; chunked kernels);
3. checkpoints under `<output>/checkpoints/` as in pretraining: a retried job (same content-addressed
   output) finds its traces and newest checkpoint and resumes; the student is published at
   `<output>/model/` in the `save_model` layout, with the teacher's tokenizer.
Outputs: `{"traces": URI, "student": URI}`.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from typing import Any

from components.distill.config import DistillConfig
from infra import storage
from infra.contract import ConfigError, StageContext, StageOutput

Config = DistillConfig
log = logging.getLogger("moeflow.distill")


def input_uris(cfg: DistillConfig) -> dict[str, str]:
    from components.refs.lineage import lineage_dataset
    from components.refs.models import resolve_model_ref

    if not cfg.teacher:
        raise ConfigError("distill.teacher: no teacher given; set it to a model URI (the `checkpoint`/`model` "
                          "output of pretrain or rl, a release, models:/NAME@ALIAS, or latest:rl for the newest "
                          "RL policy in the store): the field `teacher` of the distill form, or --set teacher=... "
                          "on the command line")
    uris = {"teacher": resolve_model_ref(cfg.teacher)}
    dataset = cfg.dataset or lineage_dataset(uris["teacher"])
    if dataset:
        uris["dataset"] = dataset
    if cfg.traces_uri:
        uris["traces"] = cfg.traces_uri
    if cfg.student.init:
        uris["student_init"] = resolve_model_ref(cfg.student.init)
    for i, f in enumerate(cfg.traces.task_files):
        uris[f"tasks{i}"] = f
    return uris


def _families(cfg: DistillConfig, dataset_dir) -> list[str]:
    from components.dataset.format import load_dataset_meta
    from components.tasks import FAMILIES

    if cfg.traces.families is not None:
        unknown = sorted(set(cfg.traces.families) - set(FAMILIES))
        if unknown:
            raise ConfigError(f"distill.traces.families: unknown {unknown}; known: {sorted(FAMILIES)}")
        return list(cfg.traces.families)
    if dataset_dir is not None:
        evals = sorted(load_dataset_meta(dataset_dir).get("eval", {}))
        if evals:
            return evals
    return sorted(FAMILIES)


def make_traces(cfg: DistillConfig, ctx: StageContext, inputs: dict[str, str], teacher
                ) -> tuple[list[dict], dict[str, Any], str]:
    """(traces, stats, traces URI): reused from `traces_uri` or an earlier try of this job, else sampled
    from the teacher and published at `<output>/traces/`."""
    from components.dataset.format import eval_problem_ids
    from components.distill.traces import collect_traces, training_prompts
    from components.refs.models import local_dir
    from components.sft.traces import STATS_FILE, load_traces, publish_traces
    from components.tasks import local_task_file

    def stats_of(uri: str) -> dict[str, Any]:
        path = storage.join_uri(uri, STATS_FILE)
        return storage.read_json(path) if storage.exists(path) else {}

    if "traces" in inputs:
        return load_traces(inputs["traces"]), stats_of(inputs["traces"]), inputs["traces"]
    uri = storage.join_uri(ctx.output_uri, "traces")
    if storage.is_published(uri):
        log.info("traces already published at %s (earlier try): reusing them", uri)
        return load_traces(uri), stats_of(uri), uri
    dataset_dir = local_dir(inputs["dataset"]) if "dataset" in inputs else None
    task_paths = [local_task_file(f, ctx.workdir / f"tasks{i}.jsonl", field=f"distill.traces.task_files[{i}]")
                  for i, f in enumerate(cfg.traces.task_files)]
    exclude = eval_problem_ids(dataset_dir)
    families: list[Any] = _families(cfg, dataset_dir)
    if dataset_dir is not None:  # draw problems with the knobs the dataset's held-out split was drawn with
        from components.dataset.format import task_family

        families = [task_family(dataset_dir, f) for f in families]
    problems = training_prompts(cfg.traces, families=families, exclude_ids=exclude, task_files=task_paths)
    t0 = time.time()
    traces, stats = collect_traces(teacher.model, teacher.tokenizer, problems, cfg.traces)
    stats["seconds"] = time.time() - t0
    stats["excluded_eval_problems"] = len(exclude)
    log.info("traces: %d kept from %d prompts x %d samples in %.1fs (accept rate %.2f)", len(traces),
             len(problems), cfg.traces.n_samples, stats["seconds"], stats.get("accept_rate", float("nan")))
    if not traces:
        raise ConfigError("distill.traces: the teacher produced no verified-correct trace; check the teacher "
                          "(evaluate it) or raise traces.n_samples / max_new_tokens")
    publish_traces(traces, stats, uri, workdir=ctx.workdir, meta={"lineage": ctx.lineage})
    return traces, stats, uri


def build_student(cfg: DistillConfig, inputs: dict[str, str], teacher_cfg) -> tuple[Any, Any]:
    """(student model, its config): from `student.init` (any model reference, a plain Hugging Face directory
    included), or freshly initialised in `student.model`'s family with the teacher's vocabulary and special
    ids."""
    import torch

    from components.model import build_model, config_from_dict, model_info
    from components.refs.models import load_model_ref

    if "student_init" in inputs:
        model = load_model_ref(inputs["student_init"]).model
        scfg = model.cfg
    else:
        data = cfg.student.model.model_dump()
        data.update(vocab_size=teacher_cfg.vocab_size, bos_token_id=teacher_cfg.bos_token_id,
                    eos_token_id=teacher_cfg.eos_token_id, pad_token_id=teacher_cfg.pad_token_id)
        try:
            scfg = config_from_dict(data)
        except ValueError as exc:
            raise ConfigError(f"distill.student.model: {exc}") from None
        torch.manual_seed(cfg.student.seed)
        model = build_model(scfg)
    if scfg.vocab_size != teacher_cfg.vocab_size:
        raise ConfigError(f"distill.student: vocabulary {scfg.vocab_size} differs from the teacher's "
                          f"{teacher_cfg.vocab_size}; the student must use the teacher's tokenizer")
    s_active, t_active = model_info(scfg)["active_params"], model_info(teacher_cfg)["active_params"]
    ratio = cfg.student.max_active_ratio
    if ratio is not None and s_active > ratio * t_active:
        raise ConfigError(f"distill.student.model: {s_active:,} active parameters exceed max_active_ratio "
                          f"{ratio} x the teacher's {t_active:,}; make the student smaller or raise the ratio")
    return model, scfg


def corpus_rows(cfg: DistillConfig, inputs: dict[str, str], teacher) -> Any:
    """(N, sft.seq_len + 1) int64 rows of the dataset's train split to mix into every batch, or None."""
    import numpy as np
    import torch

    from components.dataset.format import PackedDataset, same_tokenizer
    from components.refs.models import local_dir

    if not cfg.sft.mix_rows_per_batch:
        return None
    if "dataset" not in inputs:
        raise ConfigError("distill.sft.mix_rows_per_batch needs a dataset: set distill.dataset (the teacher's "
                          "lineage names none)")
    ds_dir = local_dir(inputs["dataset"])

    if not same_tokenizer(ds_dir, teacher.tokenizer_file):
        raise ConfigError("distill.sft.mix_rows_per_batch: the dataset's tokenizer is not the teacher's; "
                          "mix only text tokenised for the teacher (or set mix_rows_per_batch to 0)")
    ds = PackedDataset(ds_dir, "train")
    width = cfg.sft.seq_len + 1
    if ds.row_len < width:
        raise ConfigError(f"distill.sft.seq_len ({cfg.sft.seq_len}) exceeds the dataset's ({ds.seq_len})")
    n = min(len(ds), cfg.corpus_max_rows)
    return torch.from_numpy(np.stack([ds[i][:width] for i in range(n)]))


class Checkpoints:
    """Pretraining's checkpoint layout and helpers, driven by `sft_train`'s checkpoint callback (every
    `checkpoint.every` steps and at the end)."""

    def __init__(self, cfg: DistillConfig, ctx: StageContext, model_cfg):
        self.cfg, self.ctx, self.model_cfg = cfg, ctx, model_cfg

    def resume_state(self) -> dict[str, Any] | None:
        from components.refs import checkpoint as ckpt

        if not self.cfg.checkpoint.resume:
            return None
        latest = ckpt.latest_checkpoint(self.ctx.output_uri)
        if latest is None:
            return None
        step, uri = latest
        files = ckpt.read_checkpoint(ckpt.fetch_checkpoint(uri))
        log.info("resuming from %s (step %d)", uri, step)
        ckpt.set_rng_state(files["trainer"]["rng"])
        return {"step": files["trainer"]["step"], "model": files["model"], "optimizer": files["optimizer"],
                "scheduler": files["trainer"]["scheduler"]}

    def save(self, step: int, state: dict[str, Any]) -> None:
        from components.refs import checkpoint as ckpt

        local = self.ctx.workdir / "checkpoint-staging" / ckpt.step_name(step)
        ckpt.write_checkpoint(local, model_state=state["model"], optimizer_state=state["optimizer"],
                              trainer_state={"step": step, "scheduler": state["scheduler"], "rng": ckpt.rng_state()},
                              summary={"step": step, "stage": "distill"}, model_cfg=self.model_cfg)
        ckpt.publish_checkpoint(local, self.ctx.output_uri, step,
                                meta={"lineage": {"stage": "distill", "key": self.ctx.lineage.get("key")}})
        ckpt.prune_checkpoints(self.ctx.output_uri, self.cfg.checkpoint.keep)


def run(cfg: DistillConfig, ctx: StageContext) -> StageOutput:
    import torch

    from components.distill.traces import split_traces
    from components.model import model_info
    from components.refs import checkpoint as ckpt
    from components.refs.models import load_model_ref
    from components.sft.sft import completion_loss, sft_train

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    inputs = ctx.inputs
    teacher = load_model_ref(inputs["teacher"])
    traces, trace_stats, traces_uri = make_traces(cfg, ctx, inputs, teacher)
    if "traces" not in inputs:  # sampled here: the run made this dataset (a given one is logged as an input)
        ctx.tracker.log_dataset(traces_uri, storage.read_manifest(traces_uri).digest(), context="output",
                                profile={k: v for k, v in trace_stats.items() if isinstance(v, int | float)})
    train, val = split_traces(traces, cfg.traces.val_fraction)
    ctx.tracker.log_dict(trace_stats, "traces/stats.json")
    sample = random.Random(0).sample(train, min(20, len(train)))
    ctx.tracker.log_text("\n\n".join(f"{r['prompt']}{r['completion']}" for r in sample), "traces/samples.txt")

    student, scfg = build_student(cfg, inputs, teacher.cfg)
    if cfg.compile:
        from components.model.compile import compile_model

        compile_model(student)
    checkpoints = Checkpoints(cfg, ctx, scfg)
    sft_cfg = cfg.sft.model_copy(update={"ckpt_every": cfg.checkpoint.every})  # and always at the end
    resume = checkpoints.resume_state()
    t_train = time.time()
    sft_metrics = sft_train(
        student, teacher.tokenizer, train, sft_cfg, tracker=ctx.tracker,
        teacher=teacher.model if cfg.logit is not None else None, distill_cfg=cfg.logit,
        checkpoint=checkpoints.save, resume=resume, log=log.info, mix_rows=corpus_rows(cfg, inputs, teacher))
    train_s = time.time() - t_train

    metrics: dict[str, float] = {f"traces_{k}": float(v) for k, v in trace_stats.items()
                                 if isinstance(v, int | float) and not isinstance(v, bool)}
    metrics.update({"traces_train": float(len(train)), "traces_val": float(len(val))})
    if resume is not None:
        metrics["resumed_from_step"] = float(resume["step"])
    metrics.update({f"sft_{k}": float(v) for k, v in sft_metrics.items()})
    if val:
        metrics["val_completion_loss"] = completion_loss(student, teacher.tokenizer, val,
                                                         seq_len=sft_cfg.seq_len)["loss"]
        metrics["teacher_val_completion_loss"] = completion_loss(teacher.model, teacher.tokenizer, val,
                                                                 seq_len=sft_cfg.seq_len)["loss"]
    s_info, t_info = model_info(scfg), model_info(teacher.cfg)
    seconds = time.time() - t0
    metrics.update({
        "student_total_params": float(s_info["total_params"]), "student_active_params": float(s_info["active_params"]),
        "teacher_active_params": float(t_info["active_params"]),
        "active_ratio": s_info["active_params"] / t_info["active_params"],
        "train_seconds": train_s, "device_hours": seconds / 3600.0,
        "cost_usd": seconds / 3600.0 * cfg.price_per_device_hour,
    })
    ctx.tracker.log_metrics(metrics)

    local = ctx.workdir / "model"
    shutil.rmtree(local, ignore_errors=True)
    ckpt.save_model(student, scfg, local, teacher.tokenizer_file.parent,
                    extra={"stage": "distill", "teacher": inputs["teacher"], "traces": traces_uri,
                           "metrics": metrics, "lineage": ctx.lineage})
    student_uri = storage.join_uri(ctx.output_uri, ckpt.MODEL_DIR)
    storage.publish_dir(local, student_uri, meta={"kind": "model", "lineage": ctx.lineage}, overwrite=True)
    shutil.rmtree(local, ignore_errors=True)
    log.info("student published at %s", student_uri)
    return StageOutput(outputs={"traces": traces_uri, "student": student_uri}, metrics=metrics,
                       extra={"trace_stats": trace_stats})
