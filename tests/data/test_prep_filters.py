"""Normalisation, quality filters and dedup: each removes what it should and says how many."""

from __future__ import annotations

from components.data import DedupConfig, FilterConfig
from components.data.dedup import dedup
from components.data.filters import apply_filters, non_printable_ratio, normalize, repetition_ratio

GOOD = "A careful baker measured flour, sugar and three eggs for the morning bread."


def run_filters(texts: list[str], **cfg):
    keep, reports = apply_filters(texts, [f"doc{i}" for i in range(len(texts))], FilterConfig(**cfg))
    return [texts[i] for i in keep], reports


def test_normalize_applies_nfkc_and_unifies_line_endings():
    assert normalize("  ＡＢＣ １２３\u00a0ﬁne\r\nnext\rline  ") == "ABC 123 fine\nnext\nline"


def test_min_chars_removes_short_documents():
    kept, rep = run_filters([GOOD, "too short"], min_chars=16)
    assert kept == [GOOD]
    assert rep["min_chars"]["removed"] == 1 and rep["min_chars"]["documents_out"] == 1
    assert rep["min_chars"]["examples"][0].startswith("doc1: 9 chars < min_chars 16")


def test_max_chars_removes_long_documents():
    long = GOOD + " " + " ".join(f"word{i}" for i in range(100))
    kept, rep = run_filters([GOOD, long], max_chars=200)
    assert kept == [GOOD] and rep["max_chars"]["removed"] == 1 and rep["min_chars"]["removed"] == 0


def test_repetition_filter_removes_repeated_ngrams():
    spam = "buy cheap pills now " * 20
    assert repetition_ratio(spam, 3) > 0.9 and repetition_ratio(GOOD, 3) == 0.0
    kept, rep = run_filters([spam, GOOD], max_repetition_ratio=0.3)
    assert kept == [GOOD] and rep["repetition"]["removed"] == 1
    assert "repetition ratio 0.9" in rep["repetition"]["examples"][0]


def test_non_printable_filter_removes_control_characters():
    junk = GOOD[:40] + "\x00\x01\x02\x1b" * 3 + GOOD[40:]
    assert non_printable_ratio(GOOD + "\n\tmore") == 0.0 and non_printable_ratio(junk) > 0.1
    kept, rep = run_filters([junk, GOOD], max_non_printable_ratio=0.01)
    assert kept == [GOOD] and rep["non_printable"]["removed"] == 1


def test_each_document_counts_against_the_first_filter_it_fails():
    kept, rep = run_filters(["x\x00", GOOD], min_chars=5, max_non_printable_ratio=0.0)
    assert kept == [GOOD]
    assert rep["min_chars"]["removed"] == 1 and rep["non_printable"]["removed"] == 0
    assert [r["documents_in"] for r in rep.values()] == [2, 1, 1, 1]


def run_dedup(texts: list[str], **cfg):
    keep, rep = dedup(texts, [f"doc{i}" for i in range(len(texts))], DedupConfig(**cfg))
    return keep, rep


def test_exact_dedup_keeps_the_first_copy():
    keep, rep = run_dedup([GOOD, "other text entirely here", GOOD], near=False)
    assert keep == [0, 1] and rep["exact_removed"] == 1 and rep["exact_examples"] == ["doc2 = doc0"]


def test_near_dedup_removes_a_lightly_edited_copy():
    words = [f"w{i}" for i in range(200)]
    base = " ".join(words)
    edited = " ".join(words[:100] + ["changed"] + words[101:])
    unrelated = " ".join(f"z{i}" for i in range(200))
    keep, rep = run_dedup([base, unrelated, edited], threshold=0.8)
    assert keep == [0, 1] and rep["near_removed"] == 1 and rep["near_examples"] == ["doc2 ~ doc0"]
    keep, rep = run_dedup([base, unrelated, edited], near=False)
    assert keep == [0, 1, 2] and rep["near_removed"] == 0


def test_word_shingles_keep_problems_that_differ_only_in_numbers():
    from components.tasks import make_split

    docs = [p.prompt + p.completion() for p in make_split("list_ops", 1000, 0)]
    word, _ = run_dedup(docs, shingle="word", ngram=5, threshold=0.8)
    char, _ = run_dedup(docs, shingle="char", ngram=5, threshold=0.8)
    # measured: word 5-grams drop ~0.1% (true near-copies), char 5-grams ~2% of distinct problems
    assert len(docs) - len(word) <= 5
    assert len(docs) - len(char) >= 15
