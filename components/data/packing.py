"""Tokenisation and packing: documents -> `<|bos|> text <|eos|>` token stream -> fixed-length row shards.

See `format.py` for the layout this writes. Documents are encoded in batches with
`Tokenizer.encode_batch_fast` (no offsets) and appended to a buffer that is cut into shards of whole
rows; the final partial row of a split is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from components.data.progress import progress_bar

BATCH_DOCS = 1024


def encode_documents(
    tok, texts: Sequence[str], bos: int, eos: int, *, progress: bool = False, desc: str = "tokenize"
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per batch of documents: (token stream `bos t0 .. eos bos t1 .. eos` as int64, text lengths in tokens)."""
    bar = progress_bar(total=len(texts), desc=desc, unit=" doc", progress=progress)
    with bar:
        for start in range(0, len(texts), BATCH_DOCS):
            batch = list(texts[start : start + BATCH_DOCS])
            encs = tok.encode_batch_fast(batch, add_special_tokens=False)
            ids = [e.ids for e in encs]
            lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            flat: list[int] = []
            for x in ids:
                flat.append(bos)
                flat.extend(x)
                flat.append(eos)
            out = np.array(flat, dtype=np.int64)
            bar.update(len(batch))
            yield out, lengths


class ShardWriter:
    """Appends tokens to `<dir>/<split>/NNNNN.bin` shards of `rows_per_shard` rows of `row_len` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: str, row_len: int, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_len = row_len
        self.rows_per_shard = max(1, shard_tokens // row_len)
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        self.vocab_limit = np.iinfo(self.dtype).max

    def add(self, tokens: np.ndarray) -> None:
        if len(tokens) and int(tokens.max()) > self.vocab_limit:
            raise ValueError(f"token id {int(tokens.max())} does not fit {self.dtype.name}")
        self.buf.append(tokens)
        self.buffered += len(tokens)
        shard_len = self.rows_per_shard * self.row_len
        if self.buffered >= shard_len:
            flat = np.concatenate(self.buf)
            n_full = len(flat) // shard_len
            for k in range(n_full):
                self._write(flat[k * shard_len : (k + 1) * shard_len])
            rest = flat[n_full * shard_len :]
            self.buf, self.buffered = [rest], len(rest)

    def _write(self, tokens: np.ndarray) -> None:
        rel = f"{self.split}/{len(self.shards):05d}.bin"
        tokens.astype(self.dtype).tofile(self.out_dir / rel)
        self.shards.append({"file": rel, "rows": len(tokens) // self.row_len})

    def close(self) -> dict:
        """Write the last (short) shard of whole rows; returns the split's index entry."""
        flat = np.concatenate(self.buf) if self.buf else np.zeros(0, dtype=np.int64)
        n_rows = len(flat) // self.row_len
        if n_rows:
            self._write(flat[: n_rows * self.row_len])
        rows = sum(s["rows"] for s in self.shards)
        self.buf, self.buffered = [], 0
        return {
            "rows": rows,
            "tokens": rows * self.row_len,
            "shards": self.shards,
            "dropped_tail_tokens": len(flat) - n_rows * self.row_len,
        }
