"""Training data order: seeded, the same global batches whatever the world size, sharded without overlap
across ranks, resumable by one integer position, and readable from S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from components.training.data import StreamSampler, TrainBatches, open_dataset, val_batches
from infra import storage


def write_packed(root: Path, rows: dict[str, int], row_len: int = 9) -> Path:
    """A dataset directory whose row i of each split holds the tokens [i, i+1, ...] (row ids readable back)."""
    splits = {}
    for split, n in rows.items():
        data = (np.arange(n)[:, None] + np.arange(row_len)[None, :]).astype("<u2")
        (root / split).mkdir(parents=True)
        half = n // 2
        data[:half].tofile(root / split / "00000.bin")
        data[half:].tofile(root / split / "00001.bin")
        splits[split] = {"rows": n, "tokens": n * row_len, "documents": n, "dropped_tail_tokens": 0,
                         "shards": [{"file": f"{split}/00000.bin", "rows": half},
                                    {"file": f"{split}/00001.bin", "rows": n - half}]}
    meta = {"format": "moeflow-packed", "format_version": 1, "dtype": "uint16", "seq_len": row_len - 1,
            "row_len": row_len, "vocab_size": 1000, "special_tokens": {"bos": 0, "eos": 1, "pad": 2},
            "splits": splits}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def first_tokens(micro: list) -> list[int]:
    return [int(x) for inputs, _ in micro for x in inputs[:, 0]]


def test_the_stream_is_seeded_and_each_epoch_visits_every_row_once():
    a, b, c = StreamSampler(50, seed=1), StreamSampler(50, seed=1), StreamSampler(50, seed=2)
    first = a.take(50)
    assert np.array_equal(first, b.take(50))
    assert not np.array_equal(first, c.take(50))
    assert sorted(first.tolist()) == list(range(50))
    second = a.take(50)
    assert sorted(second.tolist()) == list(range(50)) and not np.array_equal(first, second)


def test_a_batch_crossing_an_epoch_boundary_takes_the_end_of_one_and_the_start_of_the_next():
    s = StreamSampler(10, seed=0)
    whole = s.peek(0, 20)
    s.position = 7
    assert np.array_equal(s.take(6), whole[7:13])


def test_ranks_split_every_global_batch_without_overlap(tmp_path):
    ds = write_packed(tmp_path, {"train": 37, "val": 5})
    single = TrainBatches(ds, global_batch=8, micro_batch=2, rank=0, world_size=1, seed=3)
    ranks = [TrainBatches(ds, global_batch=8, micro_batch=2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (37 rows)
        want = first_tokens(single.next_step())
        got = [first_tokens(r.next_step()) for r in ranks]
        assert got[0] + got[1] == want
        assert not set(got[0]) & set(got[1])


def test_inputs_and_labels_are_the_row_shifted_by_one(tmp_path):
    ds = write_packed(tmp_path, {"train": 12, "val": 4})
    (inputs, labels), = TrainBatches(ds, global_batch=3, micro_batch=3, rank=0, world_size=1, seed=0).next_step()
    assert inputs.shape == labels.shape == (3, 8)
    assert np.array_equal(labels[:, :-1].numpy(), inputs[:, 1:].numpy())
    assert np.array_equal(labels[:, -1].numpy(), inputs[:, -1].numpy() + 1)


def test_restoring_the_position_neither_replays_nor_skips_rows(tmp_path):
    ds = write_packed(tmp_path, {"train": 23, "val": 4})
    make = lambda: TrainBatches(ds, global_batch=4, micro_batch=2, rank=0, world_size=1, seed=5)
    straight = make()
    want = [first_tokens(straight.next_step()) for _ in range(12)]
    first = make()
    seen = [first_tokens(first.next_step()) for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON, as in trainer_state.json
    resumed = make()
    resumed.load_state_dict(state)
    seen += [first_tokens(resumed.next_step()) for _ in range(7)]
    assert seen == want


def test_a_changed_dataset_or_seed_refuses_the_saved_position(tmp_path):
    ds = write_packed(tmp_path, {"train": 23, "val": 4})
    state = TrainBatches(ds, global_batch=4, micro_batch=2, rank=0, world_size=1, seed=5).state_dict()
    other = TrainBatches(ds, global_batch=4, micro_batch=2, rank=0, world_size=1, seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_validation_rows_are_shared_out_equally(tmp_path):
    ds = write_packed(tmp_path, {"train": 8, "val": 7})
    per_rank = [val_batches(ds, max_rows=7, micro_batch=2, rank=r, world_size=2) for r in range(2)]
    rows = [first_tokens(b) for b in per_rank]
    assert len(rows[0]) == len(rows[1]) == 3
    assert sorted(rows[0] + rows[1]) == list(range(6))


def test_a_dataset_on_s3_is_fetched_verified_and_read(tmp_path, s3_env):
    ds = write_packed(tmp_path / "ds", {"train": 10, "val": 4})
    uri = storage.join_uri(s3_env, "datasets", "micro")
    storage.publish_dir(ds, uri)
    local = open_dataset(uri)
    assert local != ds and (local / "train" / "00001.bin").is_file()
    batches = TrainBatches(local, global_batch=10, micro_batch=10, rank=0, world_size=1, seed=0)
    assert sorted(first_tokens(batches.next_step())) == list(range(10))
