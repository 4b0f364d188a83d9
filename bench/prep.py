"""Data-prep benchmark: end-to-end tokens/s of `prepare_dataset` on the default (tiny) config, its
tokenise+pack step against plain `tokenizers` `encode_batch` / `encode_batch_fast` on the same texts in the
same run, and the near-dedup shingling comparison behind the default.

    python -m bench.prep [--repeats 3] [--out bench/results/prep_cpu.md]

Timings are the best of `--repeats` runs (the machine may be shared); ratios are what to compare.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import tempfile
import time
from pathlib import Path

from components.data import DedupConfig, PrepConfig, load_tokenizer, prepare_dataset
from components.data.dedup import dedup
from components.data.filters import normalize
from components.data.packing import ShardWriter, encode_documents
from components.data.prep import _Corpus, _eval_split, _generate, _split

RESULTS = Path(__file__).parent / "results" / "prep_cpu.md"


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def corpus_of(cfg: PrepConfig) -> _Corpus:
    corpus = _Corpus()
    _generate(cfg, corpus, _eval_split(cfg), progress=False)
    corpus.texts = [normalize(t) for t in corpus.texts]
    return corpus


def bench_end_to_end(cfg: PrepConfig, repeats: int) -> tuple[float, dict, Path]:
    root = Path(tempfile.mkdtemp(prefix="bench-prep-"))
    runs = []
    for k in range(repeats):
        t = time.perf_counter()
        stats = prepare_dataset(cfg, root / f"run{k}", progress=False)
        runs.append((time.perf_counter() - t, stats))
    wall, stats = min(runs, key=lambda r: r[0])
    return wall, stats, root / "run0"


def bench_tokenize(ds_dir: Path, texts: list[str], repeats: int) -> dict[str, tuple[float, int]]:
    tok = load_tokenizer(ds_dir)
    n_tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
    out_root = Path(tempfile.mkdtemp(prefix="bench-pack-"))

    def ours() -> int:
        writer = ShardWriter(out_root, "train", "uint16", 257, 1 << 20)
        for tokens, _ in encode_documents(tok, texts, 0, 1):
            writer.add(tokens)
        return writer.close()["tokens"]

    return {
        "moeflow tokenise + pack (encode_documents + ShardWriter)": (_best(ours, repeats)[0], n_tokens),
        "tokenizers encode_batch (same texts)": (
            _best(lambda: tok.encode_batch(texts, add_special_tokens=False), repeats)[0],
            n_tokens,
        ),
        "tokenizers encode_batch_fast (same texts)": (
            _best(lambda: tok.encode_batch_fast(texts, add_special_tokens=False), repeats)[0],
            n_tokens,
        ),
    }


def bench_shingling(corpus: _Corpus) -> list[tuple[str, int, float, dict[str, int]]]:
    rows = []
    for shingle, n in (("word", 5), ("word", 3), ("char", 5), ("char", 10)):
        t = time.perf_counter()
        keep, rep = dedup(corpus.texts, corpus.origins, DedupConfig(shingle=shingle, ngram=n, exact=False))
        secs = time.perf_counter() - t
        kept = set(keep)
        by = collections.Counter(
            "/".join(o.split("/")[:2]) for i, o in enumerate(corpus.origins) if i not in kept
        )
        rows.append((f"{shingle} {n}-grams", rep["near_removed"], secs, dict(sorted(by.items()))))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    cfg = PrepConfig()
    load0 = os.getloadavg()[0]
    wall, stats, ds_dir = bench_end_to_end(cfg, args.repeats)
    tokens = sum(s["tokens"] + s["dropped_tail_tokens"] for s in stats["tokens"].values())
    timings = stats["timings_s"]

    corpus = corpus_of(cfg)
    train_texts = _split(corpus, cfg)["train"]
    tok_rows = bench_tokenize(ds_dir, train_texts, args.repeats)
    shingle_rows = bench_shingling(corpus)

    lines = [
        "# Data prep on CPU (`python -m bench.prep`)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, load average "
        f"{load0:.1f} at start (shared machine: best of {args.repeats} runs). "
        f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}.",
        "",
        "## End to end: `prepare_dataset(PrepConfig())` (the tiny preset)",
        "",
        f"{stats['documents']['in']} documents in, {stats['documents']['out']} out; "
        f"{tokens:,} tokens (with bos/eos) into {stats['tokens']['train']['rows']} + "
        f"{stats['tokens']['val']['rows']} rows of {cfg.packing.seq_len + 1}; vocabulary "
        f"{stats['tokenizer']['vocab_size']} (requested {cfg.tokenizer.vocab_size}).",
        "",
        "| wall s | tokens/s |",
        "|---:|---:|",
        f"| {wall:.2f} | {tokens / wall:,.0f} |",
        "",
        "Steps of that run (s):",
        "",
        "| " + " | ".join(timings) + " |",
        "|" + "---:|" * len(timings),
        "| " + " | ".join(f"{v:.2f}" for v in timings.values()) + " |",
        "",
        "## Tokenisation step vs plain `tokenizers`, same texts (the training split), same run",
        "",
        "| what | s | tokens/s | vs encode_batch |",
        "|---|---:|---:|---:|",
    ]
    base = tok_rows["tokenizers encode_batch (same texts)"][0]
    for name, (secs, n) in tok_rows.items():
        lines.append(f"| {name} | {secs:.3f} | {n / secs:,.0f} | {base / secs:.2f}x |")
    lines += [
        "",
        "## Near-dedup shingling on the same corpus (threshold 0.8, 128 permutations, exact dedup off)",
        "",
        "| shingles | removed | s | removed by source |",
        "|---|---:|---:|---|",
    ]
    for name, removed, secs, by in shingle_rows:
        lines.append(f"| {name} | {removed} | {secs:.2f} | {', '.join(f'{k}: {v}' for k, v in by.items())} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
