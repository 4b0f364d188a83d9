"""Local backend: plain paths and `file://` URIs.

Every write goes to a temporary sibling (`.<name>.<random>.moeflow-tmp`) that is fsynced and then renamed
over the final name, so a reader sees either the old file, the new one, or none — never half a file.
Listings skip those temporaries.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from .errors import NotFoundError, StorageError

TMP_SUFFIX = ".moeflow-tmp"


def local_path(uri: str) -> Path:
    """The filesystem path of a plain path or a `file://` URI (`file:///abs/path`, `file://localhost/...`)."""
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file:// URIs must name a local path (file:///abs/path), not a host")
        return Path(unquote(parsed.path))
    if "://" in uri:
        raise StorageError(f"{uri}: not a local path")
    return Path(uri).expanduser()


@contextmanager
def _errors(uri: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise NotFoundError(f"{uri} does not exist") from e
    except OSError as e:
        raise StorageError(f"{uri}: {e.strerror or e}") from e


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(uri: str, data: bytes) -> None:
    with _errors(uri), atomic_path(local_path(uri)) as tmp:
        tmp.write_bytes(data)


def read_bytes(uri: str) -> bytes:
    with _errors(uri):
        return local_path(uri).read_bytes()


def put_file(local: Path, uri: str) -> None:
    with _errors(uri), atomic_path(local_path(uri)) as tmp:
        shutil.copyfile(local, tmp)


def get_file(uri: str, local: Path) -> None:
    src = local_path(uri)
    with _errors(uri):
        if not src.is_file():
            raise NotFoundError(f"{uri} does not exist" + (" (it is a directory)" if src.is_dir() else ""))
        with atomic_path(local) as tmp:
            shutil.copyfile(src, tmp)


def regular_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX path, path) of every file under `root`, sorted per directory, links never followed.

    A symlink (to a file or a directory) or a non-regular file (FIFO, socket, device) anywhere under `root`
    raises StorageError naming it: a manifest built or verified over it could describe bytes outside the
    output, or block on a FIFO. Write temporaries (`*.moeflow-tmp`) are skipped.
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = base / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                raise StorageError(f"{path} is {kind}: outputs hold regular files only (refused, not followed)")
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(TMP_SUFFIX):
                yield (base / name).relative_to(root).as_posix(), base / name


def exists(uri: str) -> bool:
    return local_path(uri).exists()


def list_relpaths(uri: str, recursive: bool) -> list[str]:
    """Relative POSIX paths of the files under the directory `uri` ([] when it is not a directory)."""
    root = local_path(uri)
    if not root.is_dir():
        return []
    out: list[str] = []
    with _errors(uri):
        if recursive:
            out = [rel for rel, _ in regular_files(root)]
        else:
            out = [p.name for p in root.iterdir() if p.is_file() and not p.name.endswith(TMP_SUFFIX)]
    return sorted(out)


def list_dirnames(uri: str) -> list[str]:
    """Names of the directories directly inside the directory `uri` (links never followed)."""
    root = local_path(uri)
    if not root.is_dir():
        return []
    with _errors(uri):
        return [p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()]


@contextmanager
def open_read(uri: str) -> Iterator[BinaryIO]:
    with _errors(uri):
        f = open(local_path(uri), "rb")  # noqa: SIM115 - closed below, after the caller's block
    with f:
        yield f


def delete_file(uri: str) -> None:
    with _errors(uri):
        local_path(uri).unlink(missing_ok=True)


def delete_prefix(uri: str) -> None:
    path = local_path(uri)
    with _errors(uri):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
