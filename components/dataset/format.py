"""The prepared-dataset format (a CONTRACT with pretraining, RL, distillation and evaluation) and its reader.

A dataset directory, as `prepare_dataset` writes it::

    dataset.json            the index below; the only file a reader needs to open first
    tokenizer.json          Hugging Face `tokenizers` byte-level BPE (load with `load_tokenizer`)
    tokenizer_config.json   lets `transformers.AutoTokenizer` / `PreTrainedTokenizerFast` load the directory
    train/00000.bin ...     packed training rows
    val/00000.bin ...       packed validation rows
    eval/<family>.jsonl     held-out problems, one JSON object a line: `Problem.to_dict()` of
                            `components.tasks` (id, family, prompt, question, answer, verifier, meta,
                            ...; `Problem.from_dict` rebuilds it); never seen in train/ or val/
    stats.json              what each step did: documents in/out per filter, tokens per split, input hashes

`dataset.json`::

    {"format": "moeflow-packed", "format_version": 1,
     "dtype": "uint16" | "uint32",       # uint16 when vocab_size <= 65536, little-endian
     "seq_len": S, "row_len": S + 1,     # each row holds S + 1 tokens: inputs row[:-1], targets row[1:]
     "vocab_size": V,
     "special_tokens": {"bos": id, "eos": id, "pad": id, "think": id, "/think": id,
                        "answer": id, "/answer": id},
     "special_token_strings": {"bos": "<|bos|>", ...},
     "tokenizer_adds_bos": true,         # Tokenizer.encode(text) returns [bos] + tokens(text)
     "splits": {"train": {"rows": R, "tokens": R * (S + 1), "documents": D, "shards":
                          [{"file": "train/00000.bin", "rows": r0}, ...], "dropped_tail_tokens": k},
                "val": {...}},
     "eval": {"<family>": {"file": "eval/<family>.jsonl", "problems": n}, ...},
     "tasks": {"families": [...], "knobs": {"<family>": {knob: value}}}}   # how problems were drawn:
                                         # RL/distillation draw theirs with the same knobs

Shard files are raw arrays, no header: `rows x row_len` tokens of `dtype`, row-major, so a shard is
`np.memmap(path, dtype, mode="r").reshape(-1, row_len)`. Shards of a split concatenate into one token
stream: every document is written as `<|bos|> text <|eos|>`, documents follow each other in a seeded
shuffled order, and the stream is cut into consecutive rows of `row_len` tokens (no padding; the final
partial row of each split is dropped and counted in `dropped_tail_tokens`). A row therefore can start
mid-document and hold the ends and starts of several; the model sees `<|bos|>` where a new document
begins. `<|pad|>` never occurs in shards; it exists for batching variable-length prompts later.

`<think>`, `</think>`, `<answer>`, `</answer>` are single tokens that `decode` keeps (they are added
tokens with special=False, so RL and evaluation can parse completions from decoded text);
`<|bos|>`, `<|eos|>`, `<|pad|>` are special and dropped by `decode(..., skip_special_tokens=True)`.
Digits are always split into single-digit tokens. The tokenizer's post-processor prepends `<|bos|>`
(like DeepSeek's): `tok.encode(prompt).ids` is what a document starts with in training; pass
`add_special_tokens=False` to encode a continuation without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "moeflow-packed"
FORMAT_VERSION = 1

# name in dataset.json -> token string. Order fixes the ids: bos=0, eos=1, pad=2, think=3, ...
SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "pad": "<|pad|>",
    "think": "<think>",
    "/think": "</think>",
    "answer": "<answer>",
    "/answer": "</answer>",
}
# the ones `decode(skip_special_tokens=True)` drops; the reasoning tags stay visible
CONTROL_TOKENS = ("bos", "eos", "pad")

SPLITS = ("train", "val")


class DatasetFormatError(ValueError):
    """A dataset directory is missing a file or does not match its `dataset.json`."""


def dtype_for_vocab(vocab_size: int) -> str:
    """'uint16' when every id fits in 16 bits, else 'uint32'."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def load_dataset_meta(dataset_dir: str | Path) -> dict[str, Any]:
    """The parsed `dataset.json` of a dataset directory (checked for format and version)."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise DatasetFormatError(f"{path}: missing; not a prepared dataset directory")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{path}: format {meta.get('format')!r} v{meta.get('format_version')} is not "
            f"{FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return meta


def load_tokenizer(dataset_dir: str | Path):
    """The dataset's `tokenizers.Tokenizer` (from `tokenizer.json`)."""
    from tokenizers import Tokenizer

    path = Path(dataset_dir) / "tokenizer.json"
    if not path.is_file():
        raise DatasetFormatError(f"{path}: missing")
    return Tokenizer.from_file(str(path))


def load_eval_split(dataset_dir: str | Path, family: str) -> list[dict[str, Any]]:
    """The held-out problems of one family: `Problem.to_dict()` dicts (id, family, prompt, question, answer,
    verifier, meta, ...); `components.tasks.Problem.from_dict(d)` turns one back into a Problem."""
    meta = load_dataset_meta(dataset_dir)
    if family not in meta.get("eval", {}):
        raise DatasetFormatError(
            f"{dataset_dir}: no evaluation split for family {family!r}; have {sorted(meta.get('eval', {}))}"
        )
    path = Path(dataset_dir) / meta["eval"][family]["file"]
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_problem_ids(dataset_dir: str | Path | None) -> set[str]:
    """Ids of every held-out evaluation problem of a prepared dataset (empty without one): never used as RL
    prompts, cold-start examples or distillation traces."""
    if dataset_dir is None:
        return set()
    ids: set[str] = set()
    for family in load_dataset_meta(dataset_dir).get("eval", {}):
        ids.update(p["id"] for p in load_eval_split(dataset_dir, family))
    return ids


def same_tokenizer(dataset_dir: str | Path, tokenizer_file: str | Path | None) -> bool:
    """Whether `tokenizer_file` is byte for byte the dataset's tokenizer (so its token rows mean the same)."""
    def sha(path: Path) -> str | None:
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    mine = sha(Path(dataset_dir) / "tokenizer.json")
    return mine is not None and tokenizer_file is not None and mine == sha(Path(tokenizer_file))


class PackedDataset:
    """Rows of one split, memory-mapped: `ds[i]` is an int64 array of `row_len` (= seq_len + 1) tokens.

    Inputs are `row[:-1]`, targets `row[1:]`. Shards are opened lazily and never read whole.
    """

    def __init__(self, dataset_dir: str | Path, split: str = "train"):
        self.dir = Path(dataset_dir)
        self.meta = load_dataset_meta(self.dir)
        if split not in self.meta["splits"]:
            raise DatasetFormatError(f"{self.dir}: no split {split!r}; have {sorted(self.meta['splits'])}")
        self.split = split
        self.row_len = int(self.meta["row_len"])
        self.seq_len = int(self.meta["seq_len"])
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.shards = self.meta["splits"][split]["shards"]
        counts = [int(s["rows"]) for s in self.shards]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._maps: list[np.ndarray | None] = [None] * len(self.shards)
        for s in self.shards:
            path = self.dir / s["file"]
            want = int(s["rows"]) * self.row_len * self.dtype.itemsize
            if not path.is_file():
                raise DatasetFormatError(f"{path}: shard listed in dataset.json is missing")
            if path.stat().st_size != want:
                raise DatasetFormatError(
                    f"{path}: {path.stat().st_size} bytes, dataset.json says {s['rows']} rows = {want} bytes"
                )

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict:
        # DataLoader workers (spawn) get the paths, not copies of mapped shards; they re-map lazily
        return {**self.__dict__, "_maps": [None] * len(self.shards)}

    def _shard(self, k: int) -> np.ndarray:
        m = self._maps[k]
        if m is None:
            m = np.memmap(self.dir / self.shards[k]["file"], dtype=self.dtype, mode="r")
            m = m.reshape(-1, self.row_len)
            self._maps[k] = m
        return m

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows of split {self.split!r}")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._shard(k)[i - self._starts[k]].astype(np.int64)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"PackedDataset({str(self.dir)!r}, {self.split!r}: {len(self)} rows x {self.row_len})"


def task_family(dataset_dir: str | Path, family: str) -> Any:
    """The task family `family` with the difficulty knobs the dataset's problems were drawn with."""
    from components.tasks import get_family

    knobs = (load_dataset_meta(dataset_dir).get("tasks") or {}).get("knobs", {})
    return get_family(family, **knobs.get(family, {}))
