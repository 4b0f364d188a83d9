"""The distill stage in-process (real store and MLflow under a temporary MOEFLOW_HOME): traces from a
teacher by rejection sampling, student SFT + logit distillation, checkpoints and resume."""

from __future__ import annotations

import json

import pytest
import torch

import components.distill.stage as distill_stage
from components.common.config import OptimConfig
from components.model import model_info
from components.refs import checkpoint as ckpt
from components.sft.sft import SFTConfig, sft_train
from components.sft.traces import load_traces
from components.tasks import load_task_file, verify_batch
from flows import registry
from flows.registry import stage_impl
from infra import storage
from infra.contract import ConfigError
from infra.entry import run_job
from infra.plan import cached_result, job_payload

STUDENT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "first_k_dense_replace": 2,
           "num_attention_heads": 2, "q_lora_rank": None, "kv_lora_rank": 8, "qk_nope_head_dim": 8,
           "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "n_group": 1, "topk_group": 1,
           "num_experts_per_tok": 2, "moe_intermediate_size": 16, "max_position_embeddings": 256, "mtp_depth": 0}


@pytest.fixture(scope="module")
def easy_tasks(tmp_path_factory):
    """Six user tasks whose answers a small teacher can memorise."""
    path = tmp_path_factory.mktemp("tasks") / "easy.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n"
                            for w in ("red", "blue", "green", "cat", "dog", "sun")))
    return path


@pytest.fixture(scope="module")
def teacher_uri(module_home, easy_tasks, tok, tmp_path_factory, config_of):
    """A small MoE teacher (1 dense + 1 MoE layer) that has memorised the easy tasks, published."""
    from components.data.tokenizer import save_tokenizer
    from components.model import Transformer

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = Transformer(config_of(vocab_size=tok.get_vocab_size(), hidden_size=48, first_k_dense_replace=1))
    examples = [{"prompt": p.prompt, "completion": f"<think>say</think><answer>{p.answer}</answer>"}
                for p in load_task_file(easy_tasks)]
    sft_train(teacher, tok, examples * 8, SFTConfig(seq_len=96, batch_size=4, max_steps=60,
                                                   optim=OptimConfig(lr=1e-2)))
    torch.set_num_threads(saved)
    tmp = tmp_path_factory.mktemp("teacher")
    save_tokenizer(tok, tmp / "tok", model_max_length=256)
    local = ckpt.save_model(teacher, teacher.cfg, tmp / "model", tmp / "tok")
    uri = storage.join_uri(module_home, "store", "pretrain", "teacher", "model")
    storage.publish_dir(local, uri, meta={"kind": "model"})
    return uri


def config(teacher_uri: str, easy_tasks, **over) -> dict:
    base = {"teacher": teacher_uri,
            "traces": {"families": [], "task_files": [str(easy_tasks)], "n_samples": 4, "max_new_tokens": 24,
                       "val_fraction": 0.0, "max_per_prompt": 2},
            "student": {"model": STUDENT, "max_active_ratio": 0.5},
            "sft": {"seq_len": 64, "batch_size": 4, "max_steps": 6},
            "logit": {"kind": "forward_kl", "kd_weight": 0.5},
            "checkpoint": {"every": 3, "keep": 2}, "threads": 1}
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return base


def run(cfg: dict):
    """The stage as `run_stage` runs it: the cached result when this config already ran, else a job."""
    plan = registry.get("distill").plan(cfg)
    cached = cached_result(plan)
    if cached is not None:
        return cached, plan
    return run_job("distill", stage_impl("distill"), job_payload(plan, parent_run_id=None, flow_run_id=None)), plan


def test_stage_publishes_verified_traces_and_a_smaller_student(teacher_uri, easy_tasks):
    result, plan = run(config(teacher_uri, easy_tasks))
    traces = load_traces(result.outputs["traces"])
    assert traces, "the memorising teacher yields traces"
    problems = {p.id: p for p in load_task_file(easy_tasks)}
    assert all(v.correct for v in verify_batch([(problems[t["id"]], t["completion"]) for t in traces]))
    assert len({(t["id"], t["completion"]) for t in traces}) == len(traces)  # deduplicated
    student, cfg = ckpt.load_model(result.outputs["student"])
    teacher, tcfg = ckpt.load_model(teacher_uri)
    assert cfg.vocab_size == tcfg.vocab_size and cfg.first_k_dense_replace >= cfg.num_hidden_layers
    assert model_info(cfg)["active_params"] <= 0.5 * model_info(tcfg)["active_params"]
    assert result.metrics["sft_steps"] == 6 and result.metrics["active_ratio"] <= 0.5
    assert [s for s, _ in ckpt.list_checkpoints(plan.output_uri)] == [3, 6]


def test_a_llama_student_is_distilled_from_the_moe_teacher(teacher_uri, easy_tasks):
    from components.model import DenseForCausalLM

    llama = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}
    result, _ = run(config(teacher_uri, easy_tasks, student={"model": llama}))
    student, cfg = ckpt.load_model(result.outputs["student"])
    _, tcfg = ckpt.load_model(teacher_uri)
    assert isinstance(student, DenseForCausalLM) and cfg.model_type == "llama" and cfg.kv_heads == 1
    assert cfg.vocab_size == tcfg.vocab_size and cfg.eos_token_id == tcfg.eos_token_id
    assert result.metrics["sft_steps"] == 6 and result.metrics["active_ratio"] <= 0.5


def test_cli_summary_names_the_student_and_the_run(teacher_uri, easy_tasks):
    from flows.distill import describe, summarize

    result, _ = run(config(teacher_uri, easy_tasks))  # the result of the test above (same config and inputs)
    summary = summarize(result)
    json.dumps(summary)
    assert summary["student_uri"] == result.outputs["student"] and summary["mlflow_run_id"]
    assert summary["trace_stats"]["kept"] == len(load_traces(summary["traces_uri"]))
    assert summary["metrics"]["active_ratio"] <= 0.5 and summary["student_uri"] in describe(summary)


def test_a_retried_job_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_does(
        teacher_uri, easy_tasks, monkeypatch):
    straight, _ = run(config(teacher_uri, easy_tasks, checkpoint={"keep": 3}))  # another key, same training

    real_save = distill_stage.Checkpoints.save

    def crash_after_first(self, step, state):
        real_save(self, step, state)
        raise RuntimeError("node lost")

    monkeypatch.setattr(distill_stage.Checkpoints, "save", crash_after_first)
    cfg = config(teacher_uri, easy_tasks, checkpoint={"keep": 4})
    with pytest.raises(RuntimeError, match="node lost"):
        run(cfg)
    monkeypatch.setattr(distill_stage.Checkpoints, "save", real_save)
    resumed, _ = run(cfg)  # the retry: same output location, finds the traces and step 3
    assert resumed.metrics["resumed_from_step"] == 3 and "resumed_from_step" not in straight.metrics
    a, _ = ckpt.load_model(straight.outputs["student"])
    b, _ = ckpt.load_model(resumed.outputs["student"])
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_a_student_above_the_active_ratio_is_a_config_error(teacher_uri, easy_tasks):
    big = {**STUDENT, "hidden_size": 64, "intermediate_size": 128}
    with pytest.raises(ConfigError, match="max_active_ratio"):
        run(config(teacher_uri, easy_tasks, student={"model": big}))


def test_missing_teacher_is_a_config_error(module_home):
    with pytest.raises(ConfigError, match="distill.teacher"):
        registry.get("distill").plan({})


def test_published_traces_are_reused_instead_of_sampled(teacher_uri, easy_tasks, monkeypatch):
    first, _ = run(config(teacher_uri, easy_tasks))

    def no_sampling(*a, **k):
        raise AssertionError("traces_uri was given: nothing is sampled")

    monkeypatch.setattr("components.distill.traces.collect_traces", no_sampling)
    again, _ = run(config(teacher_uri, easy_tasks, traces_uri=first.outputs["traces"], logit=None,
                          sft={"max_steps": 2}))
    assert again.outputs["traces"] == first.outputs["traces"] and storage.is_published(again.outputs["student"])


def _dataset(path, rows, tokenizer_json: str):
    import numpy as np

    (path / "train").mkdir(parents=True)
    np.asarray(rows).astype("<u2").tofile(path / "train" / "00000.bin")
    meta = {"format": "moeflow-packed", "format_version": 1, "dtype": "uint16", "seq_len": len(rows[0]) - 1,
            "row_len": len(rows[0]), "vocab_size": 300, "eval": {},
            "splits": {"train": {"rows": len(rows), "shards": [{"file": "train/00000.bin", "rows": len(rows)}]}}}
    (path / "dataset.json").write_text(json.dumps(meta))
    (path / "tokenizer.json").write_text(tokenizer_json)
    return path


def test_corpus_rows_come_from_a_dataset_with_the_teachers_tokenizer(teacher_uri, tmp_path):
    from types import SimpleNamespace

    from components.distill.config import DistillConfig
    from components.refs.models import local_dir

    teacher = SimpleNamespace(tokenizer_file=local_dir(teacher_uri) / "tokenizer.json")
    rows = [[i * 10 + j for j in range(12)] for i in range(6)]
    same = _dataset(tmp_path / "same", rows, teacher.tokenizer_file.read_text())
    cfg = DistillConfig(teacher="x", corpus_max_rows=4, sft={"seq_len": 8, "mix_rows_per_batch": 2})
    got = distill_stage.corpus_rows(cfg, {"dataset": str(same)}, teacher)
    assert got.tolist() == [r[:9] for r in rows[:4]]
    other = _dataset(tmp_path / "other", rows, "{}")
    with pytest.raises(ConfigError, match="tokenizer"):
        distill_stage.corpus_rows(cfg, {"dataset": str(other)}, teacher)
    off = DistillConfig(teacher="x")
    assert distill_stage.corpus_rows(off, {}, teacher) is None
