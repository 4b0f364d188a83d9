"""Exact and near-duplicate removal. The first copy (in input order) is kept; later copies are dropped.

Exact: a 128-bit BLAKE2b of the normalised text. Near: MinHash (datasketch, `affine32` scheme) over
shingles, candidates from `MinHashLSH`, and a candidate counts only when its estimated Jaccard similarity
really reaches the threshold (LSH alone lets some lower pairs through).

Shingling. The corpus holds thousands of short problems that share a prompt template and differ only in
their numbers ("Solve 3x+5=20" vs "Solve 3x+7=20"). Word n-grams over a tokenisation in which every number
and punctuation mark is its own word change in every shingle that touches a changed number, so such
problems stay apart, while prose with a word or two edited still collides. Measured on the tiny preset's
corpus (12,000 problems + 2,000 prose documents, threshold 0.8, 128 permutations; `python -m bench.prep`
reproduces it): word 5-grams remove 21 documents (0.15%: countdown problems whose numbers come in another
order and whose worked solutions coincide), word 3-grams 335, character 5-grams 461 — 7.6% of the linear
equations — and the loss grows with the corpus (more problems, more close pairs). Default: word 5-grams.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .config import DedupConfig

N_EXAMPLES = 3
_WORD = re.compile(r"\w+|[^\w\s]")
_MASK64 = (1 << 64) - 1


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass
class DedupReport:
    documents_in: int = 0
    exact_removed: int = 0
    near_removed: int = 0
    exact_examples: list[str] = field(default_factory=list)
    near_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "documents_in": self.documents_in,
            "exact_removed": self.exact_removed,
            "near_removed": self.near_removed,
            "documents_out": self.documents_in - self.exact_removed - self.near_removed,
            "exact_examples": self.exact_examples,
            "near_examples": self.near_examples,
        }


class _Ids(dict):
    """str -> 1, 2, 3... in order of first lookup."""

    def __missing__(self, key: str) -> int:
        v = self[key] = len(self) + 1
        return v


class _Shingler:
    """Maps a text to the 32-bit hashes of its shingles (deterministic: no Python `hash`)."""

    def __init__(self, unit: str, n: int):
        self.unit, self.n = unit, n
        self.ids = _Ids()
        # odd 64-bit multipliers of a polynomial hash over the n unit ids
        rng = np.random.default_rng(0x5EED)
        self.mult = (rng.integers(1, 1 << 62, size=n, dtype=np.uint64) * 2 + 1).astype(np.uint64)

    def units(self, text: str) -> list[str]:
        if self.unit == "word":
            return _WORD.findall(text)
        return list(" ".join(text.split()))

    def __call__(self, text: str) -> list[int]:
        ids = self.ids
        units = self.units(text)
        if not units:
            return []
        # ids by first appearance, so the same corpus gives the same ids (text_hash would be slower)
        arr = np.array(list(map(ids.__getitem__, units)), dtype=np.uint64)
        n = min(self.n, len(arr))
        m = len(arr) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        for k in range(n):
            h = h * np.uint64(0x100000001B3) + arr[k : k + m] * self.mult[k]
        h ^= h >> np.uint64(29)
        return np.unique((h >> np.uint64(32)).astype(np.uint32)).tolist()


def _identity(x: int) -> int:
    return x


def dedup(
    texts: list[str],
    origins: list[str],
    cfg: DedupConfig,
    *,
    progress: bool = False,
) -> tuple[list[int], dict]:
    """Indices (into `texts`, ascending) of the documents kept, and the report."""
    from datasketch import MinHash, MinHashLSH

    report = DedupReport(documents_in=len(texts))
    keep: list[int] = []
    seen: dict[bytes, int] = {}
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm) if cfg.near else None
    shingler = _Shingler(cfg.shingle, cfg.ngram)
    proto = MinHash(num_perm=cfg.num_perm, seed=1, hashfunc=_identity)
    kept_mh: dict[int, MinHash] = {}
    for i in tqdm(range(len(texts)), desc="dedup", unit=" doc", disable=not progress, leave=False):
        t = texts[i]
        if cfg.exact:
            h = text_hash(t)
            first = seen.get(h)
            if first is not None:
                report.exact_removed += 1
                if len(report.exact_examples) < N_EXAMPLES:
                    report.exact_examples.append(f"{origins[i]} = {origins[first]}")
                continue
            seen[h] = i
        if lsh is not None:
            mh = proto.copy()
            mh.update_batch(shingler(t))
            dup = None
            for j in sorted(lsh.query(mh)):
                if kept_mh[j].jaccard(mh) >= cfg.threshold:
                    dup = j
                    break
            if dup is not None:
                report.near_removed += 1
                if len(report.near_examples) < N_EXAMPLES:
                    report.near_examples.append(f"{origins[i]} ~ {origins[dup]}")
                continue
            lsh.insert(i, mh, check_duplication=False)
            kept_mh[i] = mh
        keep.append(i)
    return keep, report.as_dict()
