"""Unicode normalisation and the quality filters. Each filter says how many documents it removed and why.

`normalize` applies NFKC (compatibility forms fold: full-width digits become ASCII, ligatures split,
non-breaking spaces become spaces), turns CRLF/CR into LF and strips surrounding whitespace.
The filters then run in a fixed order — length, repetition, non-printable — and a document is counted
against the first one it fails.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from components.data.progress import progress_bar

from .config import FilterConfig

N_EXAMPLES = 3  # removed-document examples kept per filter
_EXAMPLE_CHARS = 80


def normalize(text: str) -> str:
    """NFKC, LF line endings, no surrounding whitespace."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.strip()


def repetition_ratio(text: str, n: int = 3) -> float:
    """Fraction of repeated word n-grams: 1 - unique / total (0 when the text has fewer than n words)."""
    words = text.split()
    total = len(words) - n + 1
    if total <= 1:
        return 0.0
    grams = set(zip(*(words[i:] for i in range(n)), strict=False))
    return 1.0 - len(grams) / total


def non_printable_ratio(text: str) -> float:
    """Fraction of characters that are not printable (str.isprintable), newline and tab excepted."""
    if not text:
        return 0.0
    if text.replace("\n", "").replace("\t", "").isprintable():  # fast path, all in C
        return 0.0
    bad = sum(1 for ch in text if not ch.isprintable() and ch not in "\n\t")
    return bad / len(text)


@dataclass
class FilterReport:
    """Documents that entered a filter, how many it removed, and a few examples with the reason."""

    name: str
    description: str
    documents_in: int = 0
    removed: int = 0
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "description": self.description,
            "documents_in": self.documents_in,
            "removed": self.removed,
            "documents_out": self.documents_in - self.removed,
            "examples": self.examples,
        }


def _snippet(text: str) -> str:
    s = text[:_EXAMPLE_CHARS].replace("\n", "\\n")
    return s + ("..." if len(text) > _EXAMPLE_CHARS else "")


def _checks(cfg: FilterConfig) -> list[tuple[str, str, Callable[[str], str | None]]]:
    """(name, description, check) where check returns the reason a document fails, or None."""

    def too_short(t: str) -> str | None:
        return f"{len(t)} chars < min_chars {cfg.min_chars}" if len(t) < cfg.min_chars else None

    def too_long(t: str) -> str | None:
        return f"{len(t)} chars > max_chars {cfg.max_chars}" if len(t) > cfg.max_chars else None

    def repetitive(t: str) -> str | None:
        r = repetition_ratio(t, cfg.repetition_ngram)
        if r > cfg.max_repetition_ratio:
            return f"repetition ratio {r:.2f} > {cfg.max_repetition_ratio}"
        return None

    def unprintable(t: str) -> str | None:
        r = non_printable_ratio(t)
        if r > cfg.max_non_printable_ratio:
            return f"non-printable ratio {r:.3f} > {cfg.max_non_printable_ratio}"
        return None

    return [
        ("min_chars", f"shorter than {cfg.min_chars} characters", too_short),
        ("max_chars", f"longer than {cfg.max_chars} characters", too_long),
        (
            "repetition",
            f"more than {cfg.max_repetition_ratio:.0%} repeated word {cfg.repetition_ngram}-grams",
            repetitive,
        ),
        (
            "non_printable",
            f"more than {cfg.max_non_printable_ratio:.1%} non-printable characters",
            unprintable,
        ),
    ]


def apply_filters(
    texts: list[str], origins: list[str], cfg: FilterConfig, *, progress: bool = False
) -> tuple[list[int], dict[str, dict]]:
    """Indices of the documents that pass every filter, and a report per filter (in order)."""
    checks = _checks(cfg)
    reports = [FilterReport(name, desc) for name, desc, _ in checks]
    keep: list[int] = []
    for i in progress_bar(range(len(texts)), desc="filter", unit=" doc", progress=progress):
        t = texts[i]
        for (_, _, check), rep in zip(checks, reports, strict=True):
            rep.documents_in += 1
            reason = check(t)
            if reason is not None:
                rep.removed += 1
                if len(rep.examples) < N_EXAMPLES:
                    rep.examples.append(f"{origins[i]}: {reason}: {_snippet(t)!r}")
                break
        else:
            keep.append(i)
    return keep, {rep.name: rep.as_dict() for rep in reports}
