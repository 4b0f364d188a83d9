"""evaluate(): metrics from verified samples, determinism; validation_loss against a direct computation."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import components.scoring.evaluate as evaluate_mod
from components.model.generate import GenerationResult
from components.scoring.evaluate import as_problems, evaluate, format_ok, validation_loss


def test_format_ok_accepts_only_think_then_one_answer():
    assert format_ok("<think>1+1=2.</think><answer>2</answer>")
    assert format_ok(" <think>a\nb</think> <answer>2</answer>\n")
    assert not format_ok("<answer>2</answer>")
    assert not format_ok("<think>x</think><answer></answer>")
    assert not format_ok("<think>x</think><answer>2</answer> trailing")
    assert not format_ok("<think>x</think><answer>1</answer><answer>2</answer>")


def _scripted(monkeypatch, scripts: dict[float, list[list[str]]]):
    """Replace generation: at temperature T, prompt i of the call gets the texts scripts[T][i]."""
    calls = []

    def fake(model, prompts, *, max_new_tokens, temperature, num_samples, seed, **kw):
        calls.append(seed)
        out = []
        for i in range(len(prompts)):
            texts = scripts[temperature][fake.offset[temperature] + i]
            assert len(texts) == num_samples
            for s, t in enumerate(texts):
                out.append(GenerationResult(tokens=[7] * (len(t) % 9 + 1), logprobs=[], finish_reason="stop",
                                            prompt_index=i, sample_index=s, text=t))
        fake.offset[temperature] += len(prompts)
        return out

    fake.offset = dict.fromkeys(scripts, 0)
    monkeypatch.setattr(evaluate_mod, "generate", fake)
    return calls


def test_metrics_from_scripted_samples(monkeypatch, tok, problems):
    p0, p1, p2 = problems[:3]
    right = lambda p: f"<think>ok</think><answer>{p.answer}</answer>"  # noqa: E731
    wrong = "<think>hm</think><answer>-99999</answer>"
    scripts = {
        0.6: [[wrong, right(p0), wrong, right(p0)],  # c=2; maj: tie, the wrong answer is seen first
              ["no answer"] * 4,  # c=0
              [right(p2)] * 3 + [f"<answer>{p2.answer}</answer>"]],  # c=4, one without <think>
        0.0: [[right(p0)], [wrong], [right(p2)]],
    }
    _scripted(monkeypatch, scripts)
    model = SimpleNamespace(cfg=SimpleNamespace(bos_token_id=0))
    res = evaluate(model, tok, [p0, p1, p2], n_samples=4, k_values=(1, 2, 4), batch_size=2)
    m = res["metrics"]
    assert m["pass@1"] == pytest.approx(0.5)
    assert m["pass@1_stderr"] == pytest.approx(0.5 / math.sqrt(3))
    assert m["pass@2"] == pytest.approx((5 / 6 + 0 + 1) / 3)  # 1 - C(2,2)/C(4,2) for problem 0
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(1 / 3) and m["maj@1"] == pytest.approx(1 / 3)
    assert m["greedy_accuracy"] == pytest.approx(2 / 3)
    assert m["format_rate"] == pytest.approx((1 + 0 + 0.75) / 3)
    lengths = [[len(t) % 9 + 1 for t in ts] for ts in scripts[0.6]]
    assert m["mean_response_tokens"] == pytest.approx(np.mean([np.mean(x) for x in lengths]))
    assert res["by_family"]["arithmetic"]["pass@1"] == pytest.approx(0.5)
    assert len(res["samples"]) == 3 * 5
    first = res["samples"][0]
    assert (first["answer"], first["correct"], first["format_ok"], first["sample"]) == ("-99999", False, True, 0)


def test_batches_are_seeded_from_the_seed_and_their_index(monkeypatch, tok, problems):
    texts = {0.6: [["x"]] * 5, 0.0: [["x"]] * 5}
    calls = _scripted(monkeypatch, texts)
    evaluate(SimpleNamespace(cfg=SimpleNamespace(bos_token_id=0)), tok, problems[:5], n_samples=1,
             batch_size=2, seed=3)
    assert calls[:3] == [3 * 1_000_003, 3 * 1_000_003 + 1, 3 * 1_000_003 + 2]


def test_two_runs_of_the_same_model_give_the_same_numbers(tok, problems, make_model):
    model = make_model()
    kw = dict(n_samples=3, k_values=(1, 3), max_new_tokens=12, seed=11, batch_size=4)
    a = evaluate(model, tok, problems[:6], **kw)
    b = evaluate(model, tok, problems[:6], **kw)
    assert a["metrics"] == b["metrics"]
    assert [s["text"] for s in a["samples"]] == [s["text"] for s in b["samples"]]
    c = evaluate(model, tok, problems[:6], **{**kw, "seed": 12})
    sampled = lambda r: [s["text"] for s in r["samples"] if s["sample"] != "greedy"]  # noqa: E731
    assert sampled(a) != sampled(c)


def test_problems_from_eval_split_records(problems):
    records = [json.loads(json.dumps(p.to_dict())) for p in problems[:2]]
    assert as_problems(records) == list(problems[:2])
    with pytest.raises(ValueError, match="problem 0"):
        as_problems([{"prompt": "x"}])


def test_k_larger_than_n_is_rejected(tok, problems, make_model):
    with pytest.raises(ValueError, match="k_values"):
        evaluate(make_model(), tok, problems[:1], n_samples=2, k_values=(4,))


def _write_dataset(path, rows: np.ndarray, vocab: int) -> None:
    (path / "val").mkdir(parents=True)
    rows.astype("<u2").tofile(path / "val" / "00000.bin")
    meta = {"format": "moeflow-packed", "format_version": 1, "dtype": "uint16", "seq_len": rows.shape[1] - 1,
            "row_len": rows.shape[1], "vocab_size": vocab,
            "splits": {"val": {"rows": len(rows), "tokens": rows.size, "documents": len(rows),
                               "shards": [{"file": "val/00000.bin", "rows": len(rows)}]}}, "eval": {}}
    (path / "dataset.json").write_text(json.dumps(meta))


def test_validation_loss_matches_cross_entropy_of_the_logits(tmp_path, make_model, tok):
    model = make_model()
    V = model.cfg.vocab_size
    rows = np.random.default_rng(0).integers(0, V, size=(7, 17))
    _write_dataset(tmp_path, rows, V)
    got = validation_loss(model, tmp_path, max_rows=5, batch_size=2)
    x = torch.from_numpy(rows[:5]).long()
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, V), x[:, 1:].reshape(-1))
    assert got["loss"] == pytest.approx(float(want), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(float(want)), rel=1e-5)
    assert got["tokens"] == 5 * 16
