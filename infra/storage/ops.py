"""URI-level operations: each public function picks the backend from the URI's scheme.

`s3://bucket/prefix` goes to S3; a plain path or a `file://` URI goes to the local filesystem. Listings and
joins keep the form they were given (a plain path stays a plain path, a `file://` URI stays one).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from pydantic import BaseModel

from . import local, s3
from .errors import StorageError


def is_remote(uri: str) -> bool:
    """True for object-store URIs (`s3://`)."""
    return str(uri).startswith("s3://")


def _backend(uri: str) -> ModuleType:
    if not uri:
        raise StorageError("empty storage URI")
    if is_remote(uri):
        return s3
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported scheme (use a path, file:// or s3://bucket/prefix)")
    return local


def join_uri(base: str, *parts: str) -> str:
    """`join_uri("s3://b/p", "a", "b.txt") -> "s3://b/p/a/b.txt"`; paths join as paths."""
    base = str(base)
    parts = tuple(str(p).strip("/") for p in parts if str(p).strip("/"))
    if "://" in base:
        return "/".join((base.rstrip("/"), *parts)) if parts else base
    return str(Path(base).joinpath(*parts))


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` (local: atomically, via a temporary file and a rename)."""
    _backend(uri).write_bytes(uri, bytes(data))


def read_bytes(uri: str) -> bytes:
    """The whole content of `uri`; NotFoundError (a FileNotFoundError) naming it when missing."""
    return _backend(uri).read_bytes(uri)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_json(uri: str, obj: Any, *, indent: int | None = 2) -> None:
    """Write `obj` (plain data or a pydantic model) as JSON."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    try:
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise StorageError(f"cannot write {uri} as JSON: {e}") from e
    write_text(uri, text + "\n")


def read_json(uri: str) -> Any:
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise StorageError(f"{uri} is not valid JSON: {e}") from e


def put_file(local_path: str | Path, uri: str) -> None:
    """Upload / copy the file `local_path` to `uri` (S3: multipart above the configured threshold)."""
    _backend(uri).put_file(Path(local_path), uri)


def get_file(uri: str, local_path: str | Path) -> None:
    """Download / copy `uri` to `local_path`, creating parent directories; the file appears complete."""
    _backend(uri).get_file(uri, Path(local_path))


def exists(uri: str) -> bool:
    """True for an existing file/object, or a directory/prefix (S3: one with objects under it)."""
    return _backend(uri).exists(uri)


def list_uris(prefix_uri: str, recursive: bool = True) -> list[str]:
    """Sorted URIs of the files/objects under the directory/prefix `prefix_uri` ([] when there are none).
    `recursive=False` lists only the files directly inside it."""
    rels = _backend(prefix_uri).list_relpaths(prefix_uri, recursive)
    return sorted(join_uri(prefix_uri, rel) for rel in rels)


def list_dirs(prefix_uri: str) -> list[str]:
    """Sorted names of the directories (S3: the prefixes) directly under `prefix_uri` ([] when there are none):
    one listing call per 1,000 names on S3, however many files lie below them."""
    return sorted(_backend(prefix_uri).list_dirnames(prefix_uri))


@contextmanager
def open_read(uri: str) -> Iterator[BinaryIO]:
    """A binary stream over `uri` (S3: the streaming body — read it in chunks, nothing is prefetched)."""
    with _backend(uri).open_read(uri) as stream:
        yield stream


def delete_file(uri: str) -> None:
    """Delete one file/object (no error when it is already gone)."""
    _backend(uri).delete_file(uri)


def delete_prefix(uri: str) -> None:
    """Delete `uri` and everything under `uri/` (not siblings that merely share the name's prefix)."""
    _backend(uri).delete_prefix(uri)
