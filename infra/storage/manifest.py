"""Atomic publish of a directory: files first, then `MANIFEST.json` (each file's SHA-256 and size), last.

A URI is *published* once its manifest exists; readers trust manifested files only and verify their
hashes when they fetch them. A publish that dies before the manifest leaves the URI unpublished, and a
retry simply publishes again. Outputs are content-addressed, so publishing different content over an
existing manifest is refused unless `overwrite=True`.

`Manifest.digest()` hashes the canonical JSON of `files` and `meta` (not `created`): republishing the
same content is a no-op, and fetched remote outputs are cached under `settings.home/cache/<digest>`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from infra.settings import get_settings

from . import ops
from .errors import IntegrityError, NotPublishedError, StorageError
from .local import atomic_path, local_path, regular_files

MANIFEST_NAME = "MANIFEST.json"
_PARALLEL_TRANSFERS = 4  # remote files moved at once (each large file is also split in parts by boto3)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def check_relpath(rel: str) -> str:
    """Accept a relative POSIX path inside the output: no absolute paths, `..`, `.`, empty parts or `\\`."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"manifest path {rel!r} must be a relative POSIX path inside the output (no '..')")
    if rel == MANIFEST_NAME:
        raise ValueError(f"manifest path {rel!r} is reserved for the manifest itself")
    return rel


class FileEntry(BaseModel):
    """One manifested file."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the content")
    size: int = Field(ge=0, description="size in bytes")


class Manifest(BaseModel):
    """What a published output contains. Written last; its presence makes the output visible."""

    files: dict[str, FileEntry] = Field(description="relative POSIX path -> hash and size")
    meta: dict[str, Any] = Field(default_factory=dict, description="free JSON metadata (lineage, config...)")
    created: str = Field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"), description="UTC ISO time"
    )

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for rel in files:
            check_relpath(rel)
        return files

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of `files` and `meta`: the content hash of the whole output."""
        canonical = {"files": {k: v.model_dump() for k, v in self.files.items()}, "meta": self.meta}
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def _manifest_uri(uri: str) -> str:
    return ops.join_uri(uri, MANIFEST_NAME)


def _parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as e:
        raise StorageError(f"invalid manifest {where}: {e}") from e


def read_manifest(uri: str) -> Manifest | None:
    """The manifest of the output at `uri`, or None when it is not (yet) published."""
    try:
        data = ops.read_bytes(_manifest_uri(uri))
    except FileNotFoundError:
        return None
    return _parse_manifest(data, _manifest_uri(uri))


def is_published(uri: str) -> bool:
    return read_manifest(uri) is not None


def _scan(root: Path) -> dict[str, Path]:
    """Relative POSIX path -> file, for every file under root (a top-level MANIFEST.json is skipped).
    Symlinks and non-regular files are refused (StorageError naming them), never followed."""
    found = {check_relpath(rel): path for rel, path in regular_files(root) if rel != MANIFEST_NAME}
    return dict(sorted(found.items()))


def _run_all(fn: Callable[[Any], None], items: Iterable[Any], parallel: bool) -> None:
    """Apply fn to every item (remote: a few at a time); the first failure stops the rest and is raised."""
    items = list(items)
    if not parallel or len(items) < 2:
        for item in items:
            fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=_PARALLEL_TRANSFERS)
    try:
        for future in as_completed([pool.submit(fn, item) for item in items]):
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_conflict(uri: str, new: Manifest, overwrite: bool) -> Manifest | None:
    """The existing manifest when it equals `new`; raise when it differs (unless overwrite)."""
    old = read_manifest(uri)
    if old is None or overwrite:
        return old if old is not None and old.digest() == new.digest() else None
    if old.digest() == new.digest():
        return old
    raise StorageError(
        f"{uri} is already published with different content (digest {old.digest()[:12]} != "
        f"{new.digest()[:12]}); outputs are content-addressed, so this is a bug upstream — "
        "pass overwrite=True only if replacing it is really intended"
    )


def publish_dir(
    local_dir: str | Path, uri: str, *, meta: dict[str, Any] | None = None, overwrite: bool = False
) -> Manifest:
    """Publish every file under `local_dir` at `uri`: files first, the manifest last. Returns the manifest
    (the existing one when identical content is already published there)."""
    src = Path(local_dir)
    if not src.is_dir():
        raise StorageError(f"cannot publish {src}: not a directory")
    try:
        json.dumps(meta or {})
    except (TypeError, ValueError) as e:
        raise StorageError(f"cannot publish {uri}: meta is not JSON-serializable: {e}") from e
    same_place = False
    if not ops.is_remote(uri):
        a, b = src.resolve(), local_path(uri).resolve()
        same_place = a == b
        if not same_place and (a in b.parents or b in a.parents):
            raise StorageError(f"cannot publish {src} to {uri}: source and destination overlap")

    files = _scan(src)
    manifest = Manifest(
        files={rel: FileEntry(sha256=sha256_file(p), size=p.stat().st_size) for rel, p in files.items()},
        meta=dict(meta or {}),
    )
    existing = _check_conflict(uri, manifest, overwrite)
    if existing is not None:
        return existing
    if overwrite:
        ops.delete_file(_manifest_uri(uri))  # unpublish first: readers never see a mix of old and new

    if not same_place:
        _run_all(lambda rel: ops.put_file(files[rel], ops.join_uri(uri, rel)), files, ops.is_remote(uri))
    existing = _check_conflict(uri, manifest, overwrite)  # someone may have published meanwhile
    if existing is not None:
        return existing
    ops.write_bytes(_manifest_uri(uri), manifest.model_dump_json(indent=2).encode())

    if overwrite:  # drop files of the replaced output that the new manifest does not list
        keep = {ops.join_uri(uri, rel) for rel in files} | {_manifest_uri(uri)}
        for stale in set(ops.list_uris(uri)) - keep:
            ops.delete_file(stale)
    return manifest


def _verify(path: Path, entry: FileEntry, file_uri: str, verify: bool) -> None:
    if path.is_symlink():
        raise IntegrityError(f"{file_uri} is a symlink: outputs hold regular files only (refused, not followed)")
    if not path.is_file():
        raise IntegrityError(f"{file_uri} is listed in the manifest but missing")
    size = path.stat().st_size
    if size != entry.size:
        raise IntegrityError(f"{file_uri}: size {size} differs from the manifest's {entry.size}")
    if verify:
        got = sha256_file(path)
        if got != entry.sha256:
            raise IntegrityError(f"{file_uri}: SHA-256 {got} differs from the manifest's {entry.sha256}")


def _is_complete(dest: Path, manifest: Manifest) -> bool:
    """A previous fetch finished here: its manifest copy (written last) matches and every size is right."""
    marker = dest / MANIFEST_NAME
    if not marker.is_file():
        return False
    try:
        done = Manifest.model_validate_json(marker.read_bytes())
    except ValidationError:
        return False
    if done.digest() != manifest.digest():
        return False
    return all((dest / rel).is_file() and (dest / rel).stat().st_size == e.size
               for rel, e in manifest.files.items())


def fetch_dir(uri: str, local_dir: str | Path | None = None, *, verify: bool = True) -> Path:
    """A local directory holding the published output at `uri`, every file checked against the manifest.

    - local output, `local_dir=None`: verified in place and returned as is (no copy);
    - remote output, `local_dir=None`: downloaded into `settings.home/cache/<digest>`, reused when complete;
    - `local_dir` given: downloaded / copied there (reused when a complete copy of the same digest is there).
    A copy of the manifest is written into the destination last. Raises NotPublishedError without a
    manifest and IntegrityError naming the file when one is missing or its size / SHA-256 differs.
    """
    manifest = read_manifest(uri)
    if manifest is None:
        raise NotPublishedError(
            f"{uri} is not published: it has no {MANIFEST_NAME} (nothing was published there, or the "
            "publish did not finish)"
        )
    local_source = not ops.is_remote(uri)
    if local_source and local_dir is not None and Path(local_dir).resolve() == local_path(uri).resolve():
        local_dir = None  # fetching a local output onto itself: just verify it in place
    if local_dir is None and local_source:
        root = local_path(uri)
        for _ in regular_files(root):  # refuses a symlinked file or directory anywhere in the output
            pass
        for rel, entry in manifest.files.items():
            _verify(root / rel, entry, ops.join_uri(uri, rel), verify)
        return root

    dest = Path(local_dir) if local_dir is not None else get_settings().home / "cache" / manifest.digest()
    if _is_complete(dest, manifest):
        return dest
    (dest / MANIFEST_NAME).unlink(missing_ok=True)  # a stale marker must not survive a partial fetch

    def fetch_one(rel: str) -> None:
        file_uri, target = ops.join_uri(uri, rel), dest / rel
        try:
            ops.get_file(file_uri, target)
        except FileNotFoundError as e:
            raise IntegrityError(f"{file_uri} is listed in the manifest but missing") from e
        try:
            _verify(target, manifest.files[rel], file_uri, verify)
        except IntegrityError:
            target.unlink(missing_ok=True)  # never leave bad bytes where a later fetch could reuse them
            raise

    _run_all(fetch_one, manifest.files, ops.is_remote(uri))
    with atomic_path(dest / MANIFEST_NAME) as tmp:
        tmp.write_bytes(manifest.model_dump_json(indent=2).encode())
    return dest
