"""`prepare_dataset`: read/generate -> normalise -> decontaminate -> filter -> dedup -> split -> tokenizer ->
pack, writing the directory described in `format.py`. Plus `plot_length_histogram` and `sample_documents`.

Order of the steps and why:
1. The evaluation split is drawn first (its own seed), so its ids can be excluded from generation.
2. Inputs are read and generators run; documents are held in memory (fine for the corpora this stage
   targets; a streaming version would shard by hash first).
3. NFKC normalisation, then decontamination: any document containing an evaluation question's text is
   dropped (an inverted index on one interior word of each question finds candidates, `in` confirms).
4. Quality filters, then exact and near dedup: the first copy in input order survives.
5. Train/validation split by a seeded hash of the text: each document's place is independent of the
   others, so the order is a shuffle that mixes problems and prose, and val is the first `val_fraction`.
6. The BPE is trained on the training documents only, then both splits are packed.
Same config + same inputs -> byte-identical files (nothing depends on time, hash seeds or threads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.data.progress import progress_bar
from components.dataset.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SPECIAL_TOKENS,
    PackedDataset,
    dtype_for_vocab,
    load_dataset_meta,
    load_tokenizer,
)

from .config import PrepConfig
from .dedup import dedup
from .errors import PrepError
from .filters import apply_filters, normalize
from .packing import ShardWriter, encode_documents
from .sources import expand_source, read_file
from .tokenizer import save_tokenizer, special_token_ids, train_tokenizer

log = logging.getLogger(__name__)
N_EXAMPLES = 3


class _Corpus:
    """Parallel lists of document texts and where each came from ('file:line', 'tasks/<family>/<id>')."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.origins: list[str] = []

    def add(self, text: str, origin: str) -> None:
        self.texts.append(text)
        self.origins.append(origin)

    def select(self, keep: list[int]) -> None:
        self.texts = [self.texts[i] for i in keep]
        self.origins = [self.origins[i] for i in keep]

    def __len__(self) -> int:
        return len(self.texts)


def prepare_dataset(cfg: PrepConfig, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Write the complete dataset into `out_dir` (must be empty or absent) and return its statistics.

    The returned dict is `stats.json`'s content plus `timings_s` (seconds per step, not written, so the
    files stay byte-identical between runs). Raises `PrepError` on bad input, naming the file or line.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PrepError(f"{out_dir}: output directory is not empty")
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 4)
        clock[0] = now

    stats: dict[str, Any] = {"config": cfg.model_dump(mode="json")}
    pipeline: list[dict[str, Any]] = []

    eval_problems = _eval_split(cfg)
    lap("eval_split")

    corpus = _Corpus()
    stats["inputs"] = _read_sources(cfg, corpus, progress)
    n_read = len(corpus)
    lap("read")
    stats["generators"] = _generate(cfg, corpus, eval_problems, progress)
    lap("generate")
    if len(corpus) == 0:
        raise PrepError("empty input: no documents at all (no sources and every generator is off)")
    pipeline.append({"step": "read", "documents_out": n_read})
    pipeline.append({"step": "generate", "documents_out": len(corpus) - n_read})

    corpus.texts = [normalize(t) for t in progress_bar(corpus.texts, desc="normalize", progress=progress)]
    lap("normalize")

    questions = [p.question for ps in eval_problems.values() for p in ps]
    keep, contamination = _decontaminate(corpus, questions)
    corpus.select(keep)
    pipeline.append({"step": "decontaminate", **contamination})
    lap("decontaminate")

    keep, filter_reports = apply_filters(corpus.texts, corpus.origins, cfg.filters, progress=progress)
    corpus.select(keep)
    pipeline += [{"step": f"filter:{k}", **v} for k, v in filter_reports.items()]
    lap("filter")

    keep, dedup_report = dedup(corpus.texts, corpus.origins, cfg.dedup, progress=progress)
    corpus.select(keep)
    n_in = dedup_report["documents_in"]
    pipeline.append({"step": "dedup:exact", "documents_in": n_in, "removed": dedup_report["exact_removed"],
                     "documents_out": n_in - dedup_report["exact_removed"],
                     "examples": dedup_report["exact_examples"]})
    n_in -= dedup_report["exact_removed"]
    pipeline.append({"step": "dedup:near", "documents_in": n_in, "removed": dedup_report["near_removed"],
                     "documents_out": n_in - dedup_report["near_removed"],
                     "examples": dedup_report["near_examples"]})
    lap("dedup")
    if len(corpus) == 0:
        raise PrepError("no documents left after filtering and dedup; see the filter settings")
    stats["pipeline"] = pipeline

    splits = _split(corpus, cfg)
    lap("split")

    tok = train_tokenizer(splits["train"], cfg.tokenizer, length=len(splits["train"]), progress=progress)
    ids = special_token_ids(tok)
    vocab_size = tok.get_vocab_size()
    save_tokenizer(tok, out_dir, model_max_length=cfg.packing.seq_len)
    lap("tokenizer")

    dtype = dtype_for_vocab(vocab_size)
    row_len = cfg.packing.seq_len + 1
    split_meta: dict[str, Any] = {}
    lengths: list[np.ndarray] = []
    for name, texts in splits.items():
        writer = ShardWriter(out_dir, name, dtype, row_len, cfg.packing.shard_tokens)
        text_tokens = 0
        for tokens, lens in encode_documents(
            tok, texts, ids["bos"], ids["eos"], progress=progress, desc=f"tokenize {name}"
        ):
            writer.add(tokens)
            text_tokens += int(lens.sum())
            lengths.append(lens)
        split_meta[name] = {"documents": len(texts), **writer.close(), "text_tokens": text_tokens}
        if split_meta[name]["rows"] == 0 and texts:
            raise PrepError(
                f"split {name!r}: {text_tokens + 2 * len(texts)} tokens do not fill one row of "
                f"packing.seq_len + 1 = {row_len}; add data, lower packing.seq_len or raise val_fraction"
            )
    lap("pack")

    eval_meta = _write_eval(out_dir, eval_problems)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "seq_len": cfg.packing.seq_len,
        "row_len": row_len,
        "vocab_size": vocab_size,
        "special_tokens": ids,
        "special_token_strings": dict(SPECIAL_TOKENS),
        "tokenizer_adds_bos": True,
        "splits": split_meta,
        "eval": eval_meta,
        "tasks": {"families": list(cfg.generators.tasks.families), "knobs": cfg.generators.tasks.knobs},
    }
    _write_json(out_dir / "dataset.json", meta)

    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    total_chars = sum(len(t) for ts in splits.values() for t in ts)
    stats.update(
        {
            "documents": {
                "read": n_read,
                "malformed_skipped": sum(r["malformed"] for r in stats["inputs"]),
                "generated": stats["generators"]["documents"],
                "in": n_read + stats["generators"]["documents"],
                "out": len(corpus),
                **{name: len(t) for name, t in splits.items()},
            },
            "tokenizer": {
                "vocab_size": vocab_size,
                "vocab_size_requested": cfg.tokenizer.vocab_size,
                "trained_on_documents": len(splits["train"]),
                "special_tokens": ids,
                "chars_per_token": round(total_chars / max(1, int(all_lengths.sum())), 4),
            },
            "tokens": {
                name: {k: m[k] for k in ("documents", "text_tokens", "rows", "tokens", "dropped_tail_tokens")}
                for name, m in split_meta.items()
            },
            "doc_token_lengths": _length_summary(all_lengths),
            "eval": {f: m["problems"] for f, m in eval_meta.items()},
        }
    )
    _write_json(out_dir / "stats.json", stats)
    lap("write")
    log.info("prepared %s: %s", out_dir, {k: v["tokens"] for k, v in split_meta.items()})
    return {**stats, "timings_s": {**timings, "total": round(sum(timings.values()), 4)}}


# ----------------------------------------------------------------------------------------------------- steps


def _eval_split(cfg: PrepConfig) -> dict[str, list]:
    if cfg.eval.n_per_family == 0:
        return {}
    from components.tasks import make_split

    return {
        f: list(make_split(cfg.generators.tasks.family(f), cfg.eval.n_per_family, cfg.eval.seed))
        for f in cfg.generators.tasks.families
    }


def _read_sources(cfg: PrepConfig, corpus: _Corpus, progress: bool) -> list[dict[str, Any]]:
    reports = []
    for src in cfg.sources:
        for uri in expand_source(src):
            docs, rep = read_file(uri, src, max_bad_fraction=cfg.max_bad_fraction, progress=progress)
            for text, where in docs:
                corpus.add(text, where)
            if rep.malformed:
                log.warning("%s: skipped %d malformed records, e.g. %s", uri, rep.malformed, rep.malformed_examples)
            reports.append(vars(rep))
    return reports


def _generate(cfg: PrepConfig, corpus: _Corpus, eval_problems: dict[str, list], progress: bool) -> dict:
    from .english import generic_documents

    gen = cfg.generators
    out: dict[str, Any] = {"tasks": {}, "generic_text": 0, "documents": 0}
    if gen.tasks.n_per_family > 0:
        from components.tasks import make_split

        for family in progress_bar(gen.tasks.families, desc="generate tasks", progress=progress):
            exclude = [p.id for p in eval_problems.get(family, [])]
            problems = list(make_split(gen.tasks.family(family), gen.tasks.n_per_family, cfg.seed,
                                       exclude_ids=exclude))
            able = [i for i, p in enumerate(problems) if p.wrong_solution is not None and p.wrong_answer]
            n_wrong = round(gen.tasks.wrong_fraction_for(family) * len(able))
            wrong = set(random.Random(f"{cfg.seed}/{family}/wrong").sample(able, n_wrong))
            for i, p in enumerate(problems):
                corpus.add(p.prompt + p.completion(correct=i not in wrong), f"tasks/{family}/{p.id}")
            out["tasks"][family] = {"problems": len(problems), "wrong_answers": n_wrong}
            out["documents"] += len(problems)
    if gen.generic_text.n_docs > 0:
        g = gen.generic_text
        docs = generic_documents(g.n_docs, cfg.seed, g.min_sentences, g.max_sentences)
        for i, text in enumerate(docs):
            corpus.add(text, f"generic/{i}")
        out["generic_text"] = len(docs)
        out["documents"] += len(docs)
    return out


_TOKEN = re.compile(r"\w+|[^\w\s]")
_KEY_TOKENS = 8
_CONTINUES = frozenset("+-*/(^%")  # a question preceded by one of these is the tail of another expression


def _standalone(joined: str, question: str, sep: str) -> bool:
    """Whether `question` occurs in `joined` other than as the tail of a longer expression."""
    start = joined.find(question)
    while start != -1:
        if joined[:start].rsplit(sep, 1)[-1] not in _CONTINUES:
            return True
        start = joined.find(question, start + 1)
    return False


def _decontaminate(corpus: _Corpus, questions: list[str]) -> tuple[list[int], dict[str, Any]]:
    """Drop documents containing any of `questions` as a run of whole tokens (after normalisation).

    Tokens are `\\w+` words and single punctuation marks, whitespace ignored, so "6+8 = ?" is found in
    "Q: 6+8 = ?" and "6 + 8 = ?" but not inside "3*16+8 = ?" nor as the tail of "10+6+8 = ?" (a token run
    right after an operator belongs to a different, longer problem).
    Each question is indexed under its first k tokens (k = 8, or the shortest
    question's length); a document's token k-grams find the candidates, a joined-token substring test
    confirms them. Linear in the corpus size.
    """
    sep = "\x00"
    qtoks = [t for t in (_TOKEN.findall(q) for q in sorted({normalize(q) for q in questions})) if t]
    k = min([_KEY_TOKENS] + [len(t) for t in qtoks])  # one key length: one k-gram set per document
    by_key: dict[tuple[str, ...], list[str]] = {}
    for toks in qtoks:
        by_key.setdefault(tuple(toks[:k]), []).append(sep + sep.join(toks) + sep)
    keep, examples, removed = [], [], 0
    for i, text in enumerate(corpus.texts):
        hit = None
        if by_key:
            toks = _TOKEN.findall(text)
            grams = by_key.keys() & set(zip(*(toks[j:] for j in range(k)), strict=False))
            if grams:
                joined = sep + sep.join(toks) + sep
                hit = next((q for g in sorted(grams) for q in by_key[g] if _standalone(joined, q, sep)), None)
        if hit is None:
            keep.append(i)
            continue
        removed += 1
        if len(examples) < N_EXAMPLES:
            examples.append(f"{corpus.origins[i]}: contains eval question {' '.join(hit.split(sep)).strip()!r}")
    n = len(corpus)
    return keep, {
        "documents_in": n,
        "removed": removed,
        "documents_out": n - removed,
        "eval_questions": sum(len(v) for v in by_key.values()),
        "examples": examples,
    }


def _split(corpus: _Corpus, cfg: PrepConfig) -> dict[str, list[str]]:
    """Seeded hash order (a shuffle independent of input order); val = the first val_fraction of it."""
    salt = f"moeflow-split/{cfg.seed}/".encode()
    order = sorted(
        range(len(corpus)),
        key=lambda i: hashlib.blake2b(salt + corpus.texts[i].encode("utf-8"), digest_size=16).digest(),
    )
    n = len(order)
    n_val = round(cfg.val_fraction * n)
    if cfg.val_fraction > 0:
        n_val = max(1, n_val)
    if n - n_val < 1:
        raise PrepError(f"only {n} documents: too few for a training split with val_fraction {cfg.val_fraction}")
    return {
        "train": [corpus.texts[i] for i in order[n_val:]],
        "val": [corpus.texts[i] for i in order[:n_val]],
    }


def _write_eval(out_dir: Path, eval_problems: dict[str, list]) -> dict[str, Any]:
    meta = {}
    for family, problems in eval_problems.items():
        rel = f"eval/{family}.jsonl"
        (out_dir / "eval").mkdir(parents=True, exist_ok=True)
        with open(out_dir / rel, "w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps(p.to_dict(), sort_keys=True, ensure_ascii=False) + "\n")
        meta[family] = {"file": rel, "problems": len(problems)}
    return meta


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _length_summary(lengths: np.ndarray) -> dict[str, Any]:
    if len(lengths) == 0:
        return {"documents": 0}
    top = int(lengths.max())
    edges = np.unique(np.linspace(0, max(top, 1), 31).round().astype(np.int64))
    counts, _ = np.histogram(lengths, bins=edges)
    return {
        "documents": int(len(lengths)),
        "mean": round(float(lengths.mean()), 2),
        "p50": int(np.percentile(lengths, 50)),
        "p90": int(np.percentile(lengths, 90)),
        "p99": int(np.percentile(lengths, 99)),
        "max": top,
        "total": int(lengths.sum()),
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


# ----------------------------------------------------------------------------------------- reporting helpers


def plot_length_histogram(stats_or_lengths: dict | Any, path: str | Path) -> Path:
    """Write a PNG histogram of document lengths in tokens, from `prepare_dataset`'s stats (or a dataset's
    `stats.json` content) or from a sequence of lengths. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        if isinstance(stats_or_lengths, dict):
            summary = stats_or_lengths.get("doc_token_lengths", stats_or_lengths)
            if "histogram" not in summary:
                raise ValueError("stats have no 'doc_token_lengths.histogram'; pass prepare_dataset's stats")
            edges = np.asarray(summary["histogram"]["edges"])
            counts = np.asarray(summary["histogram"]["counts"])
            ax.stairs(counts, edges, fill=True)
            title = f"{summary['documents']} documents, mean {summary['mean']} tokens"
        else:
            lengths = np.asarray(list(stats_or_lengths))
            if lengths.size == 0:
                raise ValueError("no lengths to plot")
            ax.hist(lengths, bins=30)
            title = f"{lengths.size} documents, mean {lengths.mean():.1f} tokens"
        ax.set_xlabel("document length (tokens)")
        ax.set_ylabel("documents")
        ax.set_title(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def sample_documents(
    dataset_dir: str | Path, split: str = "train", n: int = 5, *, seed: int = 0, max_tokens: int = 1024
) -> list[dict[str, Any]]:
    """`n` whole documents decoded from the packed rows of a split (for a quick look, e.g. in MLflow).

    Each is {"row": first row, "tokens": n, "text": decoded text (specials kept)}; documents are
    found by their `<|bos|>` and may span rows; longer than `max_tokens` ones are cut there.
    """
    meta = load_dataset_meta(dataset_dir)
    ds = PackedDataset(dataset_dir, split)
    tok = load_tokenizer(dataset_dir)
    bos, eos = meta["special_tokens"]["bos"], meta["special_tokens"]["eos"]
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    starts = sorted(rng.sample(range(len(ds)), min(n, len(ds)))) if len(ds) else []
    for r in starts:
        row, k = ds[r], r
        pos = np.flatnonzero(row == bos)
        while len(pos) == 0 and k + 1 < len(ds):  # a document longer than a row: look further on
            k += 1
            row = ds[k]
            pos = np.flatnonzero(row == bos)
        if len(pos) == 0:
            continue
        toks = list(row[pos[0] :])
        while eos not in toks and k + 1 < len(ds) and len(toks) < max_tokens:
            k += 1
            toks += list(ds[k])
        if eos in toks:
            toks = toks[: toks.index(eos) + 1]
        toks = toks[:max_tokens]
        out.append({"row": r, "tokens": len(toks), "text": tok.decode(toks, skip_special_tokens=False)})
    return out
