"""Rejection sampling: verified-correct, distinct traces; the published SFT dataset and its reader."""

from __future__ import annotations

import json

import pytest

from components.sft.traces import load_traces, publish_traces, rejection_sample, write_traces
from components.tasks import verify
from infra import storage
from infra.settings import get_settings


def test_kept_traces_are_verified_distinct_and_capped(tiny_base):
    model, tok, problems = tiny_base.load(), tiny_base.tokenizer(), tiny_base.problems()[:10]
    traces, stats = rejection_sample(model, tok, problems, n_samples=6, temperature=1.0, top_p=1.0,
                                     max_new_tokens=24, seed=3, batch_size=4)
    by_id = {p.id: p for p in problems}
    assert traces, "the tiny base solves some of its own problems"
    assert stats["samples"] == 60 and stats["kept"] == len(traces)
    assert stats["correct"] == stats["kept"] + stats["duplicates"]
    assert sum(f["kept"] for f in stats["by_family"].values()) == len(traces)
    keys = [(t["id"], " ".join(t["completion"].split())) for t in traces]
    assert len(keys) == len(set(keys))
    for t in traces:
        assert verify(by_id[t["id"]], t["completion"]).correct
        assert t["prompt"] == by_id[t["id"]].prompt and t["family"] == "arithmetic"
    again, _ = rejection_sample(model, tok, problems, n_samples=6, temperature=1.0, top_p=1.0, max_new_tokens=24,
                                seed=3, batch_size=4)
    assert again == traces  # seeded
    capped, _ = rejection_sample(model, tok, problems, n_samples=6, temperature=1.0, top_p=1.0,
                                 max_new_tokens=24, seed=3, batch_size=4, max_per_problem=1)
    assert len({t["id"] for t in capped}) == len(capped) == len({t["id"] for t in traces})


def test_completions_cut_at_the_limit_are_never_kept(tiny_base):
    model, tok, problems = tiny_base.load(), tiny_base.tokenizer(), tiny_base.problems()[:6]
    traces, stats = rejection_sample(model, tok, problems, n_samples=4, max_new_tokens=4, seed=0)
    assert traces == [] and stats["truncated"] == stats["samples"] == 24


def test_published_traces_round_trip_and_bad_lines_are_named(moeflow_home, tmp_path):
    rows = [{"prompt": "Q: 1+1 = ?\nA:", "completion": "<think>1+1=2.</think><answer>2</answer>",
             "family": "arithmetic", "id": "a"}]
    uri = storage.join_uri(get_settings().store_uri, "rl", "traces")
    publish_traces(rows, {"kept": 1}, uri, workdir=tmp_path)
    assert storage.is_published(uri)
    assert load_traces(uri) == rows
    assert json.loads(storage.read_text(storage.join_uri(uri, "stats.json"))) == {"kept": 1}

    local = write_traces(rows, {}, tmp_path / "local")
    with open(local / "traces.jsonl", "a") as f:
        f.write('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"traces.jsonl:2: needs string fields 'prompt' and 'completion'"):
        load_traces(local)
    with pytest.raises(FileNotFoundError, match="no traces.jsonl"):
        load_traces(tmp_path / "nowhere")
