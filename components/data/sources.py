"""Input readers: JSONL, Parquet and plain text, each optionally gzipped, local or on S3 (via `infra.storage`).

A source URI names one file, or a directory/prefix whose files are all read in sorted order (names
starting with '.' or '_' are skipped, like Spark's `_SUCCESS`). Gzip is recognised by its magic bytes,
so `.jsonl.gz` and `.txt.gz` need no setting. Files are streamed and hashed (SHA-256 of the stored bytes)
as they are read, so S3 inputs are read exactly once.

Plain text: by default the whole file is one document (`text_unit="file"`), which suits corpora stored
one document per file; `text_unit="paragraph"` makes every blank-line-separated paragraph a document
(for a single file holding many short texts).

Malformed records — a JSONL line that is not valid JSON / UTF-8, not an object, lacks the text field or
holds a non-string there; a Parquet null; undecodable text — are counted, and the first few kept as
`file:line: reason`. More than `max_bad_fraction` of a file's records malformed stops the stage with a
`PrepError` quoting them. An empty file (no records) and a URI that does not exist are errors naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from components.data.progress import progress_bar

from .config import SourceConfig
from .errors import PrepError

N_EXAMPLES = 5  # malformed-record examples kept per file
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}


@dataclass
class FileReport:
    """What reading one file found."""

    uri: str
    format: str
    sha256: str = ""
    bytes: int = 0
    gzip: bool = False
    records: int = 0
    documents: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)

    def bad(self, where: str, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < N_EXAMPLES:
            self.malformed_examples.append(f"{where}: {reason}")


class _HashingRaw(io.RawIOBase):
    """A raw stream over `f` that SHA-256s and counts every byte read through it."""

    def __init__(self, f: Any):
        self.f = f
        self.sha = hashlib.sha256()
        self.n = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.n += n
        return n


def detect_format(uri: str) -> str | None:
    """'jsonl' | 'parquet' | 'text' from the file name (a trailing .gz ignored); None when unknown."""
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def expand_source(src: SourceConfig) -> list[str]:
    """The file URIs a source names: itself, or the files under it when it is a directory / prefix."""
    from infra.storage import StorageError, exists, list_uris

    if not exists(src.uri):
        raise PrepError(f"{src.uri}: input does not exist (sources[].uri)")
    try:
        files = list_uris(src.uri)
    except StorageError as e:  # a symlink or FIFO inside a directory source: refused, never followed
        raise PrepError(f"{src.uri}: {e} (sources[].uri)") from e
    if not files:
        return [src.uri]
    files = [u for u in files if not u.rsplit("/", 1)[-1].startswith((".", "_"))]
    if not files:
        raise PrepError(f"{src.uri}: empty input: the directory holds no files")
    return files


def read_file(
    uri: str, src: SourceConfig, *, max_bad_fraction: float, progress: bool = False
) -> tuple[list[tuple[str, str]], FileReport]:
    """Read one file: ([(text, 'file:line'), ...], report). Raises `PrepError` on bad input."""
    from infra.storage import StorageError, open_read

    fmt = src.format if src.format != "auto" else detect_format(uri)
    if fmt is None:
        raise PrepError(
            f"{uri}: cannot tell the format from the name; set sources[].format to jsonl, parquet or text"
        )
    report = FileReport(uri=uri, format=fmt)
    docs: list[tuple[str, str]] = []
    try:
        with open_read(uri) as raw_stream:
            hashing = _HashingRaw(raw_stream)
            buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
            report.gzip = buffered.peek(2)[:2] == b"\x1f\x8b"
            stream: Any = gzip.GzipFile(fileobj=buffered, mode="rb") if report.gzip else buffered
            bar = progress_bar(desc=f"read {uri.rsplit('/', 1)[-1]}", unit=" rec", progress=progress)
            with bar:
                reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text}[fmt]
                for text, where in reader(stream, uri, src, report):
                    docs.append((text, where))
                    bar.update()
            while buffered.read(1 << 20):  # hash the whole stored file even if a reader stopped early
                pass
    except StorageError as e:
        raise PrepError(f"{uri}: cannot read input: {e}") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise PrepError(f"{uri}: corrupt gzip data: {e}") from e
    report.sha256 = hashing.sha.hexdigest()
    report.bytes = hashing.n
    report.documents = len(docs)
    _check(report, max_bad_fraction)
    return docs, report


def _check(report: FileReport, max_bad_fraction: float) -> None:
    if report.records == 0:
        raise PrepError(f"{report.uri}: empty input: no records in the file")
    frac = report.malformed / report.records
    if frac > max_bad_fraction:
        raise PrepError(
            f"{report.uri}: {report.malformed} of {report.records} records are malformed ({frac:.1%} > "
            f"max_bad_fraction {max_bad_fraction:g}); first: " + "; ".join(report.malformed_examples),
            examples=report.malformed_examples,
        )
    if report.documents == 0:
        raise PrepError(f"{report.uri}: empty input: no usable documents", examples=report.malformed_examples)


def _read_jsonl(stream: Any, uri: str, src: SourceConfig, report: FileReport) -> Iterator[tuple[str, str]]:
    key = src.text_field
    for lineno, line in enumerate(stream, 1):
        if not line.strip():
            continue
        report.records += 1
        where = f"{uri}:{lineno}"
        try:
            obj = json.loads(line)
        except UnicodeDecodeError:
            report.bad(where, "invalid UTF-8")
            continue
        except json.JSONDecodeError as e:
            report.bad(where, f"bad JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            report.bad(where, f"not a JSON object but {type(obj).__name__}")
            continue
        if key not in obj:
            report.bad(where, f"missing text field {key!r}")
            continue
        text = obj[key]
        if not isinstance(text, str):
            report.bad(where, f"text field {key!r} is {type(text).__name__}, not a string")
            continue
        yield text, where


def _read_parquet(stream: Any, uri: str, src: SourceConfig, report: FileReport) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = stream.read()  # Parquet needs random access; S3 bodies are not seekable
    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise PrepError(f"{uri}: not a readable Parquet file: {e}") from e
    schema = pf.schema_arrow
    key = src.text_field
    if key not in schema.names:
        raise PrepError(f"{uri}: no column {key!r} (sources[].text_field); columns are {schema.names}")
    col_type = schema.field(key).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
        raise PrepError(f"{uri}: column {key!r} is {col_type}, not a string column")
    row = 0
    for batch in pf.iter_batches(columns=[key], batch_size=8192):
        for text in batch.column(0).to_pylist():
            row += 1
            report.records += 1
            if text is None:
                report.bad(f"{uri}:{row}", f"null {key!r}")
                continue
            yield text, f"{uri}:{row}"


def _decode(raw: bytes, where: str, report: FileReport) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.bad(where, f"invalid UTF-8 at byte {e.start}")
        return None


def _read_text(stream: Any, uri: str, src: SourceConfig, report: FileReport) -> Iterator[tuple[str, str]]:
    if src.text_unit == "file":
        raw = stream.read()
        if not raw.strip():
            return
        report.records += 1
        text = _decode(raw, f"{uri}:1", report)
        if text is not None:
            yield text, f"{uri}:1"
        return
    para: list[bytes] = []
    start = 0
    for lineno, line in enumerate(stream, 1):
        if line.strip():
            if not para:
                start = lineno
            para.append(line)
            continue
        if para:
            yield from _paragraph(para, f"{uri}:{start}", report)
            para = []
    if para:
        yield from _paragraph(para, f"{uri}:{start}", report)


def _paragraph(lines: list[bytes], where: str, report: FileReport) -> Iterator[tuple[str, str]]:
    report.records += 1
    text = _decode(b"".join(lines).rstrip(b"\r\n"), where, report)
    if text is not None:
        yield text, where
