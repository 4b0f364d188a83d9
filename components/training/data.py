"""Training data: the prepared dataset by URI, a seeded global order, sharded across ranks, resumable.

Order. Epoch `e` visits the rows of the training split in the permutation drawn by
`numpy.random.default_rng([seed, e])`; epochs follow each other, forming one endless stream. Optimizer
step `k` consumes stream positions `[k*G, (k+1)*G)` (G = the global batch), and rank `r` of `W` takes
the contiguous `G/W` rows `[r*G/W, (r+1)*G/W)` of that global batch, which it splits into micro-batches.
The stream does not depend on the world size, so a run on 1 process and one on 2 see the same global
batches, and the state to resume is one integer: the stream position. Restoring it replays nothing and
skips nothing.

Storage. `open_dataset` resolves a URI with `infra.storage.fetch_dir`: a local published dataset is
verified in place; an S3 one is downloaded once (by local rank 0, the others wait at a barrier) into
the settings' cache, then memory-mapped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.dataset.format import PackedDataset, load_dataset_meta
from infra import storage

log = logging.getLogger(__name__)


def open_dataset(uri: str, *, local_rank: int = 0, barrier=None) -> Path:
    """Local directory of the published dataset at `uri` (verified against its manifest).

    Local rank 0 fetches first; `barrier()` (when given) makes the other ranks on the node wait for it,
    then they find the complete cached copy.
    """
    if local_rank == 0:
        path = storage.fetch_dir(uri)
        if barrier is not None:
            barrier()
    else:
        if barrier is not None:
            barrier()
        path = storage.fetch_dir(uri, verify=False)
    load_dataset_meta(path)
    return path


class StreamSampler:
    """The seeded endless stream of row indices; `take(G)` returns the next global batch's rows."""

    def __init__(self, n_rows: int, seed: int, position: int = 0):
        if n_rows <= 0:
            raise ValueError("the training split has no rows")
        self.n_rows, self.seed, self.position = int(n_rows), int(seed), int(position)
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def peek(self, start: int, count: int) -> np.ndarray:
        """Row indices at stream positions `[start, start + count)` (does not move the position)."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            pos = start + filled
            epoch, offset = divmod(pos, self.n_rows)
            n = min(count - filled, self.n_rows - offset)
            out[filled : filled + n] = self._permutation(epoch)[offset : offset + n]
            filled += n
        return out

    def take(self, count: int) -> np.ndarray:
        rows = self.peek(self.position, count)
        self.position += count
        return rows

    @property
    def epoch(self) -> float:
        return self.position / self.n_rows

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "n_rows": self.n_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n_rows"]) != self.n_rows or int(state["seed"]) != self.seed:
            raise ValueError(
                f"checkpoint data state is for {state['n_rows']} rows with seed {state['seed']}, this run has "
                f"{self.n_rows} rows with seed {self.seed}: the dataset or seed changed"
            )
        self.position = int(state["position"])


class TrainBatches:
    """This rank's micro-batches of each global batch: `next_step()` -> list of (inputs, labels) int64."""

    def __init__(self, dataset_dir: str | Path, *, global_batch: int, micro_batch: int, rank: int,
                 world_size: int, seed: int, seq_len: int | None = None):
        self.ds = PackedDataset(dataset_dir, "train")
        self.seq_len = seq_len or self.ds.seq_len
        if self.seq_len > self.ds.seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the dataset's seq_len {self.ds.seq_len}")
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of {micro_batch} x {world_size}")
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.sampler = StreamSampler(len(self.ds), seed)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def rows_for_step(self) -> np.ndarray:
        """This rank's row indices of the next global batch (advances the stream by the global batch)."""
        rows = self.sampler.take(self.global_batch)
        per_rank = self.global_batch // self.world_size
        return rows[self.rank * per_rank : (self.rank + 1) * per_rank]

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = self.rows_for_step()
        data = np.stack([self.ds[int(i)][: self.seq_len + 1] for i in rows])
        batch = torch.from_numpy(data)
        return [(mb[:, :-1].contiguous(), mb[:, 1:].contiguous()) for mb in batch.split(self.micro_batch)]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def val_batches(dataset_dir: str | Path, *, max_rows: int, micro_batch: int, rank: int, world_size: int,
                seq_len: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the first rows of the validation split (every rank gets as many rows, so
    collective forward passes line up); [] when the split has fewer rows than ranks."""
    ds = PackedDataset(dataset_dir, "val")
    seq_len = seq_len or ds.seq_len
    n = (min(len(ds), max_rows) // world_size) * world_size
    if n == 0:
        return []
    mine = range(rank, n, world_size)
    data = torch.from_numpy(np.stack([ds[i][: seq_len + 1] for i in mine]))
    return [(mb[:, :-1].contiguous(), mb[:, 1:].contiguous()) for mb in data.split(micro_batch)]
