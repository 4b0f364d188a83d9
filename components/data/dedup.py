"""Exact and near-duplicate removal. The first copy (in input order) is kept; later copies are dropped.

Exact: a 128-bit BLAKE2b of the normalised text. Near: MinHash (datasketch, `affine32` scheme) over
shingles, candidates from `MinHashLSH`, and a candidate counts only when its estimated Jaccard similarity
really reaches the threshold (LSH alone lets some lower pairs through).

Shingling. The corpus holds thousands of short problems that share a prompt template and differ only in
their numbers ("Solve 3x+5=20" vs "Solve 3x+7=20"). Word n-grams over a tokenisation in which every number
and punctuation mark is its own word change in every shingle that touches a changed number, so such
problems stay apart, while prose with a word or two edited still collides. Measured on the tiny preset's
corpus (12,000 problems + 2,000 prose documents, threshold 0.8, 128 permutations; `python -m bench.prep`
reproduces it, see bench/results/prep_cpu.md): word 5-grams remove 24 documents (0.17%: mostly countdown
problems whose numbers come in another order and whose worked solutions coincide), word 3-grams 389,
character 5-grams 408 (7% of the list problems, 4.5% of the linear equations), character 10-grams 14.
The loss grows with the corpus (more problems, more close pairs). Default: word 5-grams.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

from components.data.progress import progress_bar

from .config import DedupConfig

N_EXAMPLES = 3
_WORD = re.compile(r"\w+|[^\w\s]")


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
    """Maps a text to its set of shingles, each a tuple of n unit ids (ids by first appearance)."""

    def __init__(self, unit: str, n: int):
        self.unit, self.n = unit, n
        self.ids = _Ids()

    def __call__(self, text: str) -> set[tuple[int, ...]]:
        units = _WORD.findall(text) if self.unit == "word" else list(" ".join(text.split()))
        ids = list(map(self.ids.__getitem__, units))
        n = min(self.n, len(ids))
        return set(zip(*(ids[k:] for k in range(n)), strict=False)) if n else set()


def _shingle_hash(shingle: tuple[int, ...]) -> int:
    # the hash of a tuple of ints is not salted (PYTHONHASHSEED only affects str/bytes): deterministic
    return hash(shingle) & 0xFFFFFFFF


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
    mh = MinHash(num_perm=cfg.num_perm, seed=1, hashfunc=_shingle_hash)  # reused: cleared per document
    signatures: dict[int, np.ndarray] = {}  # kept documents' MinHash values, to confirm LSH candidates
    for i in progress_bar(range(len(texts)), desc="dedup", unit=" doc", progress=progress):
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
            mh.clear()
            mh.update_batch(shingler(t))
            dup = None
            for j in sorted(lsh.query(mh)):
                # estimated Jaccard = share of equal MinHash values (what MinHash.jaccard computes)
                if np.count_nonzero(signatures[j] == mh.hashvalues) >= cfg.threshold * cfg.num_perm:
                    dup = j
                    break
            if dup is not None:
                report.near_removed += 1
                if len(report.near_examples) < N_EXAMPLES:
                    report.near_examples.append(f"{origins[i]} ~ {origins[dup]}")
                continue
            lsh.insert(i, mh, check_duplication=False)
            signatures[i] = mh.hashvalues.copy()
        keep.append(i)
    return keep, report.as_dict()
