"""prepare_dataset end to end: layout, packing round trip, eval split, determinism, reader, config."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from pydantic import ValidationError

from components.data import (
    PackedDataset,
    PrepConfig,
    PrepError,
    load_dataset_meta,
    load_eval_split,
    load_tokenizer,
    plot_length_histogram,
    prepare_dataset,
    sample_documents,
)
from components.data.english import generic_documents
from components.data.packing import ShardWriter
from components.dataset.format import FORMAT_NAME, dtype_for_vocab
from components.tasks import Problem, extract_answer, make_split


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, small_config):
    """The small config (4 families x 40 problems + 40 prose docs, 10 eval problems per family), rows of
    33 tokens in shards of 50 rows: (dir, stats)."""
    out = tmp_path_factory.mktemp("ds") / "out"
    return out, prepare_dataset(small_config(), out, progress=False)


def split_stream(ds_dir, split: str) -> np.ndarray:
    ds = PackedDataset(ds_dir, split)
    return np.concatenate([ds[i] for i in range(len(ds))]) if len(ds) else np.zeros(0, dtype=np.int64)


def segments(ds_dir, split: str) -> tuple[list[list[int]], list[int]]:
    """The split's stream cut at each <|bos|>: complete documents' text ids, and the trailing partial one."""
    meta = load_dataset_meta(ds_dir)
    bos, eos = meta["special_tokens"]["bos"], meta["special_tokens"]["eos"]
    stream = split_stream(ds_dir, split).tolist()
    assert not stream or stream[0] == bos
    starts = [i for i, t in enumerate(stream) if t == bos] + [len(stream)]
    docs, tail = [], []
    for a, b in zip(starts, starts[1:], strict=False):
        seg = stream[a:b]
        if b == len(stream) and seg[-1] != eos:
            tail = seg
            continue
        assert seg[-1] == eos and eos not in seg[1:-1] and bos not in seg[1:]
        docs.append(seg[1:-1])
    return docs, tail


def decoded_documents(ds_dir, split: str) -> list[str]:
    tok = load_tokenizer(ds_dir)
    return [tok.decode(ids, skip_special_tokens=False) for ids in segments(ds_dir, split)[0]]


# --------------------------------------------------------------------------------------------- layout


def test_dataset_json_indexes_every_shard_with_its_rows(dataset):
    ds_dir, stats = dataset
    meta = load_dataset_meta(ds_dir)
    assert (meta["format"], meta["dtype"], meta["seq_len"], meta["row_len"]) == (FORMAT_NAME, "uint16", 32, 33)
    assert meta["special_tokens"] == {"bos": 0, "eos": 1, "pad": 2, "think": 3, "/think": 4, "answer": 5, "/answer": 6}
    assert meta["vocab_size"] == load_tokenizer(ds_dir).get_vocab_size() == stats["tokenizer"]["vocab_size"] <= 400
    for split in ("train", "val"):
        m = meta["splits"][split]
        assert m["rows"] == sum(s["rows"] for s in m["shards"]) > 0
        assert m["tokens"] == m["rows"] * 33 == stats["tokens"][split]["tokens"]
        assert m["tokens"] + m["dropped_tail_tokens"] == m["text_tokens"] + 2 * m["documents"]
        for s in m["shards"]:
            assert (ds_dir / s["file"]).stat().st_size == s["rows"] * 33 * 2
    assert len(meta["splits"]["train"]["shards"]) > 1 and meta["splits"]["train"]["shards"][0]["rows"] == 50
    assert sorted(p.name for p in ds_dir.iterdir()) == [
        "dataset.json", "eval", "stats.json", "tokenizer.json", "tokenizer_config.json", "train", "val"
    ]


def test_stats_chain_documents_through_every_step(dataset):
    _, stats = dataset
    steps = stats["pipeline"]
    assert [s["step"] for s in steps] == [
        "read", "generate", "decontaminate", "filter:min_chars", "filter:max_chars", "filter:repetition",
        "filter:non_printable", "dedup:exact", "dedup:near",
    ]
    assert steps[2]["documents_in"] == steps[0]["documents_out"] + steps[1]["documents_out"] == 200
    for prev, cur in zip(steps[2:], steps[3:], strict=False):
        assert cur["documents_in"] == prev["documents_out"] == prev["documents_in"] - prev["removed"]
    docs = stats["documents"]
    assert docs["out"] == steps[-1]["documents_out"] == docs["train"] + docs["val"]
    assert stats["generators"]["tasks"]["arithmetic"] == {"problems": 40, "wrong_answers": 10}
    assert json.loads((dataset[0] / "stats.json").read_text()) == {k: v for k, v in stats.items() if k != "timings_s"}
    assert stats["timings_s"]["total"] > 0


# ---------------------------------------------------------------------------------------------- packing


def test_rows_reproduce_the_documents_token_stream(tmp_path, write_jsonl, sources_only):
    docs = generic_documents(60, seed=5)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "out"
    prepare_dataset(sources_only({"uri": str(src)}, val_fraction=0.0), out, progress=False)
    meta = load_dataset_meta(out)
    tok = load_tokenizer(out)
    encoded = {tuple(tok.encode(d, add_special_tokens=False).ids): d for d in docs}
    complete, tail = segments(out, "train")
    assert len(complete) == len({tuple(c) for c in complete})  # no document twice
    assert all(tuple(c) in encoded for c in complete)  # each one exactly one input document
    rest = [ids for ids in encoded if list(ids) not in complete]
    # the partial last segment starts one remaining document; the remaining ones were cut off as the tail
    assert tail and any([0, *ids, 1][: len(tail)] == tail for ids in rest)
    assert sum(len(ids) + 2 for ids in rest) - len(tail) == meta["splits"]["train"]["dropped_tail_tokens"]
    assert [tok.decode(c) for c in complete] == [encoded[tuple(c)] for c in complete]


def test_packed_dataset_reads_rows_across_shards(dataset):
    ds_dir, _ = dataset
    ds = PackedDataset(ds_dir, "train")
    meta = load_dataset_meta(ds_dir)
    raw = np.concatenate(
        [np.fromfile(ds_dir / s["file"], dtype="<u2") for s in meta["splits"]["train"]["shards"]]
    ).reshape(-1, 33)
    assert len(ds) == len(raw) == meta["splits"]["train"]["rows"]
    for i in (0, 49, 50, 51, len(ds) - 1):
        row = ds[i]
        assert row.dtype == np.int64 and row.shape == (33,)
        np.testing.assert_array_equal(row, raw[i])
    np.testing.assert_array_equal(ds[-1], raw[-1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_uint32_shards_round_trip_ids_above_65535(tmp_path):
    assert (dtype_for_vocab(65536), dtype_for_vocab(65537)) == ("uint16", "uint32")
    tokens = np.arange(70_000, 70_000 + 5 * 9, dtype=np.int64)
    writer = ShardWriter(tmp_path, "train", "uint32", row_len=9, shard_tokens=18)
    writer.add(tokens)
    index = writer.close()
    assert [s["rows"] for s in index["shards"]] == [2, 2, 1] and index["dropped_tail_tokens"] == 0
    meta = {"format": FORMAT_NAME, "format_version": 1, "dtype": "uint32", "seq_len": 8, "row_len": 9,
            "splits": {"train": index}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = PackedDataset(tmp_path, "train")
    np.testing.assert_array_equal(np.stack([ds[i] for i in range(len(ds))]).ravel(), tokens)


def test_uint16_writer_refuses_ids_that_do_not_fit(tmp_path):
    writer = ShardWriter(tmp_path, "train", "uint16", row_len=4, shard_tokens=8)
    with pytest.raises(ValueError, match="does not fit uint16"):
        writer.add(np.array([1, 70_000], dtype=np.int64))


def test_text_too_short_for_one_row_is_an_error(tmp_path, write_jsonl, sources_only):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "A short line of text, only one."}] * 1)
    with pytest.raises(PrepError, match=r"packing\.seq_len"):
        prepare_dataset(sources_only({"uri": str(src)}, packing={"seq_len": 256}, val_fraction=0.0),
                        tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------- eval split


def test_eval_split_is_written_per_family(dataset):
    ds_dir, _ = dataset
    meta = load_dataset_meta(ds_dir)
    assert sorted(meta["eval"]) == ["arithmetic", "countdown", "linear_equation", "list_ops"]
    rows = load_eval_split(ds_dir, "arithmetic")
    expected = make_split("arithmetic", 10, 99)
    assert [r["id"] for r in rows] == [p.id for p in expected]
    assert {"id", "family", "prompt", "question", "answer"} <= set(rows[0])
    assert [Problem.from_dict(r) for r in rows] == expected


def test_eval_problems_never_appear_in_training_documents(dataset):
    ds_dir, _ = dataset
    text = "\n".join(decoded_documents(ds_dir, "train") + decoded_documents(ds_dir, "val"))
    assert text.count("Q: ") > 100  # the problems are there...
    for family in ("arithmetic", "countdown", "linear_equation", "list_ops"):
        for r in load_eval_split(ds_dir, family):
            assert f"Q: {r['question']}\nA:" not in text  # ...but none of the held-out ones


def test_documents_quoting_an_eval_question_are_dropped(tmp_path, small_config, write_jsonl, prose):
    leaked = [p.question for p in make_split("countdown", 10, 99)[:3]]
    rows = [{"text": f"{prose[i]} Somebody asked: {q} Nobody knew."} for i, q in enumerate(leaked)]
    rows += [{"text": t} for t in prose]
    src = write_jsonl(tmp_path / "web.jsonl", rows)
    stats = prepare_dataset(small_config(sources=[{"uri": str(src)}]), tmp_path / "out", progress=False)
    step = next(s for s in stats["pipeline"] if s["step"] == "decontaminate")
    assert step["removed"] >= 3 and sum(f"{src}:" in e for e in step["examples"]) >= 1
    text = "\n".join(decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val"))
    assert not [q for q in leaked if q in text]
    assert sum(p in text for p in prose) >= 5  # the clean prose stayed (one may fall in the cut tail)


def test_wrong_fraction_sets_the_share_of_wrong_answers(tmp_path, small_config):
    cfg = small_config(generators={"tasks": {"families": ["arithmetic"], "n_per_family": 200,
                                             "wrong_fraction": 0.5}, "generic_text": {"n_docs": 0}})
    prepare_dataset(cfg, tmp_path / "out", progress=False)
    eval_ids = [p.id for p in make_split("arithmetic", 10, 99)]
    truth = {p.question: p.answer for p in make_split("arithmetic", 200, 3, exclude_ids=eval_ids)}
    seen = wrong = 0
    for doc in decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val"):
        q = re.search(r"Q: (.*)\nA:", doc).group(1)
        seen += 1
        wrong += extract_answer(doc) != truth[q]
    assert seen > 150 and 0.4 < wrong / seen < 0.6


# ------------------------------------------------------------------------------------------ determinism


def test_same_config_gives_byte_identical_files(tmp_path, small_config, write_jsonl, prose):
    src = write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in prose])
    cfg = small_config(sources=[{"uri": str(src)}])
    a, b = tmp_path / "a", tmp_path / "b"
    prepare_dataset(cfg, a, progress=False)
    prepare_dataset(cfg, b, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) > 8
    assert [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()] == []
    c = tmp_path / "c"
    prepare_dataset(small_config(sources=[{"uri": str(src)}], seed=4), c, progress=False)
    assert (a / "train" / "00000.bin").read_bytes() != (c / "train" / "00000.bin").read_bytes()


def test_output_directory_must_be_empty(tmp_path, small_config):
    (tmp_path / "stale.bin").write_bytes(b"x")
    with pytest.raises(PrepError, match="not empty"):
        prepare_dataset(small_config(), tmp_path, progress=False)


# ------------------------------------------------------------------------------------------ reporting


def test_length_histogram_is_written_as_png(dataset, tmp_path):
    _, stats = dataset
    for source, name in ((stats, "a.png"), ([3, 5, 8, 8, 13], "b.png")):
        path = plot_length_histogram(source, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no lengths"):
        plot_length_histogram([], tmp_path / "c.png")


def test_sample_documents_are_whole_documents_of_the_split(dataset):
    ds_dir, _ = dataset
    samples = sample_documents(ds_dir, "train", n=4, seed=1)
    assert len(samples) == 4
    docs = set(decoded_documents(ds_dir, "train"))
    for s in samples:
        assert s["text"].startswith("<|bos|>")
        if s["text"].endswith("<|eos|>"):
            assert s["text"][len("<|bos|>") : -len("<|eos|>")] in docs
    assert sample_documents(ds_dir, "train", n=4, seed=1) == samples


# --------------------------------------------------------------------------------------------- config


def test_defaults_are_the_tiny_preset():
    cfg = PrepConfig()
    assert cfg.generators.tasks.families == ["arithmetic", "countdown", "linear_equation", "list_ops"]
    assert (cfg.generators.tasks.n_per_family, cfg.generators.generic_text.n_docs) == (3000, 2000)
    assert (cfg.tokenizer.vocab_size, cfg.packing.seq_len) == (2048, 256)


def test_every_config_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(PrepConfig)


@pytest.mark.parametrize(
    "patch, where",
    [
        ({"tokenizer": {"vocab_size": 100}}, "tokenizer.vocab_size"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"dedup": {"threshold": 0}}, "dedup.threshold"),
        ({"generators": {"tasks": {"families": ["poetry"]}}}, "generators.tasks.families"),
        ({"sources": [{"uri": "a.jsonl", "formt": "jsonl"}]}, "sources.0.formt"),
        ({"filters": {"min_chars": 50, "max_chars": 10}}, "filters"),
    ],
)
def test_config_errors_name_the_field(patch, where):
    with pytest.raises(ValidationError) as err:
        PrepConfig.model_validate(patch)
    locs = [".".join(str(x) for x in e["loc"]) for e in err.value.errors()]
    assert where in locs, locs



def test_packed_dataset_pickles_without_its_mapped_shards(dataset):
    import pickle

    ds = PackedDataset(dataset[0], "train")
    rows = np.stack([ds[i] for i in range(len(ds))])  # maps every shard
    blob = pickle.dumps(ds)
    assert len(blob) < len(ds) * ds.row_len * 2 / 4  # paths and the index, not the shard contents
    np.testing.assert_array_equal(np.stack(list(pickle.loads(blob))), rows)


def test_task_knobs_shape_the_problems_and_are_recorded(tmp_path):
    from components.data import PrepConfig, load_eval_split, prepare_dataset, task_family

    cfg = PrepConfig.model_validate({
        "generators": {"tasks": {"families": ["arithmetic"], "n_per_family": 60,
                                 "knobs": {"arithmetic": {"max_operands": 2, "max_value": 9}}},
                       "generic_text": {"n_docs": 40}},
        "eval": {"n_per_family": 10}, "tokenizer": {"vocab_size": 300}, "packing": {"seq_len": 32}})
    out = tmp_path / "ds"
    prepare_dataset(cfg, out, progress=False)
    fam = task_family(out, "arithmetic")
    assert (fam.max_operands, fam.max_value) == (2, 9)
    for p in load_eval_split(out, "arithmetic"):
        numbers = [int(t) for t in re.findall(r"\d+", p["question"])]
        assert len(numbers) == 2 and max(numbers) <= 9, p["question"]


def test_unknown_task_knob_is_named():
    import pytest
    from pydantic import ValidationError

    from components.data import PrepConfig

    with pytest.raises(ValidationError, match="max_operandz"):
        PrepConfig.model_validate({"generators": {"tasks": {"knobs": {"arithmetic": {"max_operandz": 2}}}}})


def test_a_longer_problem_ending_in_an_eval_question_is_kept():
    from components.data.prep import _Corpus, _decontaminate

    corpus = _Corpus()
    corpus.add("Q: 10+5+12 = ?\nA: <think>10+5=15. 15+12=27.</think><answer>27</answer>", "tasks/a/1")
    corpus.add("Q: 5+12 = ?\nA: <think>5+12=17.</think><answer>17</answer>", "tasks/a/2")
    corpus.add("Somebody asked what 5+12 = ? is.", "web/3")
    keep, stats = _decontaminate(corpus, ["5+12 = ?"])
    assert keep == [0] and stats["removed"] == 2
