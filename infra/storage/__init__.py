"""Storage: one API over local paths / `file://` and `s3://bucket/prefix` (boto3, any S3-compatible store).

Byte, text, JSON and file transfers, listings and streaming reads work the same on both backends.
Multi-file outputs are published atomically with `publish_dir` (files first, `MANIFEST.json` with every
file's SHA-256 last) and read back with `fetch_dir`, which trusts manifested files only and verifies them.

Modules: `ops` (URI-level operations), `local` and `s3` (backends), `manifest` (publish / fetch),
`errors`. Everything public is re-exported here; import from `infra.storage`.
"""

from .errors import IntegrityError, NotFoundError, NotPublishedError, StorageError
from .manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    fetch_dir,
    is_published,
    publish_dir,
    read_manifest,
    sha256_file,
)
from .ops import (
    delete_file,
    delete_prefix,
    exists,
    get_file,
    is_remote,
    join_uri,
    list_dirs,
    list_uris,
    open_read,
    put_file,
    read_bytes,
    read_json,
    read_text,
    write_bytes,
    write_json,
    write_text,
)
from .s3 import reset_clients

__all__ = [
    "MANIFEST_NAME",
    "FileEntry",
    "IntegrityError",
    "Manifest",
    "NotFoundError",
    "NotPublishedError",
    "StorageError",
    "delete_file",
    "delete_prefix",
    "exists",
    "fetch_dir",
    "get_file",
    "is_published",
    "is_remote",
    "join_uri",
    "list_dirs",
    "list_uris",
    "open_read",
    "publish_dir",
    "put_file",
    "read_bytes",
    "read_json",
    "read_manifest",
    "read_text",
    "reset_clients",
    "sha256_file",
    "write_bytes",
    "write_json",
    "write_text",
]
