"""S3 backend (AWS or any S3-compatible store: MinIO, Ceph, moto...) through boto3.

The client follows `settings.s3`: custom endpoint, path-style addressing, botocore "standard" retries
with exponential backoff (`max_attempts` attempts in all, the first included), bounded waits
(`connect_timeout_s`, `read_timeout_s`: an endpoint that never answers fails in about
attempts x timeout, with a message naming the endpoint), and, for custom
endpoints, checksums only where the operation requires them (boto3 >= 1.36 otherwise sends CRC
checksums that many S3-compatible stores reject). Files above `multipart_threshold_mb` upload and
download in parts. One client is cached per (endpoint, region, credentials, ...); `reset_clients()`
drops them (tests change the environment).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from infra.settings import S3Settings, get_settings

from .errors import NotFoundError, StorageError

log = logging.getLogger("moeflow.storage")
MiB = 1024 * 1024

_clients: dict[tuple, Any] = {}
_lock = threading.Lock()


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key/` -> ("bucket", "some/key")."""
    if not uri.startswith("s3://"):
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
    return bucket, key.strip("/")


def split_object(uri: str) -> tuple[str, str]:
    """Like split_uri, for operations on one object: the key must not be empty."""
    bucket, key = split_uri(uri)
    if not key:
        raise StorageError(f"{uri}: names a bucket, not an object (s3://bucket/key)")
    return bucket, key


def _secrets(cfg: S3Settings) -> list[str]:
    return [s.get_secret_value() for s in (cfg.access_key_id, cfg.secret_access_key) if s is not None]


def _scrub(text: str) -> str:
    """Remove the configured credentials from text taken from a server or library message."""
    for secret in _secrets(get_settings().s3):
        if secret:
            text = text.replace(secret, "***")
    return text


def get_client() -> Any:
    """The cached boto3 S3 client for the current settings."""
    cfg = get_settings().s3
    ak = cfg.access_key_id.get_secret_value() if cfg.access_key_id else None
    sk = cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else None
    if (ak is None) != (sk is None):
        raise StorageError(
            "set both s3.access_key_id and s3.secret_access_key (MOEFLOW_S3__ACCESS_KEY_ID / "
            "MOEFLOW_S3__SECRET_ACCESS_KEY), or neither to use boto3's default credential chain"
        )
    key = (cfg.endpoint_url, cfg.region, ak, sk, cfg.addressing_style, cfg.max_attempts, cfg.connect_timeout_s,
           cfg.read_timeout_s)
    with _lock:
        client = _clients.get(key)
        if client is None:
            options: dict[str, Any] = {}
            if cfg.endpoint_url:
                options = {"request_checksum_calculation": "when_required",
                           "response_checksum_validation": "when_required"}
            config = Config(
                region_name=cfg.region,
                s3={"addressing_style": cfg.addressing_style},
                retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},  # incl. the first
                connect_timeout=cfg.connect_timeout_s,
                read_timeout=cfg.read_timeout_s,
                **options,
            )
            session = boto3.session.Session(aws_access_key_id=ak, aws_secret_access_key=sk)
            client = session.client("s3", endpoint_url=cfg.endpoint_url, config=config)
            log.debug("S3 client: endpoint=%s region=%s addressing=%s max_attempts=%d",
                      cfg.endpoint_url or "aws", cfg.region, cfg.addressing_style, cfg.max_attempts)
            _clients[key] = client
        return client


def reset_clients() -> None:
    """Forget every cached client (after the settings changed)."""
    with _lock:
        _clients.clear()


def transfer_config() -> TransferConfig:
    threshold = get_settings().s3.multipart_threshold_mb * MiB
    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold)


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


@contextmanager
def _errors(uri: str, op: str) -> Iterator[None]:
    """Turn boto errors into StorageError / NotFoundError messages that name the URI."""
    try:
        yield
    except StorageError:
        raise
    except ClientError as e:
        code = _error_code(e)
        if code in ("NoSuchKey", "404", "NotFound"):
            raise NotFoundError(f"{uri} does not exist") from e
        if code == "NoSuchBucket":
            raise StorageError(f"cannot {op} {uri}: bucket '{split_uri(uri)[0]}' does not exist") from e
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(
                f"cannot {op} {uri}: access denied ({code}); check s3.access_key_id / s3.secret_access_key"
            ) from e
        message = _scrub(str(e.response.get("Error", {}).get("Message", "")))
        raise StorageError(f"cannot {op} {uri}: {code}: {message}") from e
    except (NoCredentialsError, PartialCredentialsError) as e:
        raise StorageError(
            f"cannot {op} {uri}: no S3 credentials; set MOEFLOW_S3__ACCESS_KEY_ID and "
            "MOEFLOW_S3__SECRET_ACCESS_KEY or configure boto3's default credential chain"
        ) from e
    except (BotoCoreError, S3UploadFailedError) as e:
        cfg = get_settings().s3
        endpoint = cfg.endpoint_url or "AWS"
        waited = ""
        if isinstance(e, (ConnectTimeoutError, ReadTimeoutError)):
            waited = (f" -- no answer within s3.connect_timeout_s={cfg.connect_timeout_s:g} / "
                      f"s3.read_timeout_s={cfg.read_timeout_s:g} s, {cfg.max_attempts} attempt(s)")
        raise StorageError(f"cannot {op} {uri} (endpoint {endpoint}): {_scrub(str(e))}{waited}") from e


def write_bytes(uri: str, data: bytes) -> None:
    bucket, key = split_object(uri)
    with _errors(uri, "write"):
        get_client().put_object(Bucket=bucket, Key=key, Body=data)


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as body:
        with _errors(uri, "read"):
            return body.read()


def put_file(local: Path, uri: str) -> None:
    bucket, key = split_object(uri)
    if not local.is_file():
        raise NotFoundError(f"{local} does not exist (uploading to {uri})")
    with _errors(uri, "upload to"):
        get_client().upload_file(str(local), bucket, key, Config=transfer_config())


def get_file(uri: str, local: Path) -> None:
    """Download to `local` (s3transfer writes a temporary file and renames it when complete)."""
    bucket, key = split_object(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    with _errors(uri, "download"):
        get_client().download_file(bucket, key, str(local), Config=transfer_config())


def exists(uri: str) -> bool:
    """True for an object, or for a prefix with at least one object under `uri/`."""
    bucket, key = split_uri(uri)
    client = get_client()
    if key:
        try:
            with _errors(uri, "check"):
                client.head_object(Bucket=bucket, Key=key)
            return True
        except NotFoundError:
            pass
    with _errors(uri, "list"):
        page = client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
    return page.get("KeyCount", 0) > 0


def _keys(uri: str, recursive: bool) -> Iterator[str]:
    bucket, key = split_uri(uri)
    prefix = f"{key}/" if key else ""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if not recursive:
        kwargs["Delimiter"] = "/"
    with _errors(uri, "list"):
        for page in get_client().get_paginator("list_objects_v2").paginate(**kwargs):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # skip "folder" marker objects
                    yield obj["Key"]


def list_relpaths(uri: str, recursive: bool) -> list[str]:
    _, key = split_uri(uri)
    skip = len(key) + 1 if key else 0
    return sorted(k[skip:] for k in _keys(uri, recursive))


def list_dirnames(uri: str) -> list[str]:
    """Names of the prefixes directly under `uri` (`<uri>/<name>/...`), from the listing's CommonPrefixes."""
    bucket, key = split_uri(uri)
    prefix = f"{key}/" if key else ""
    names: list[str] = []
    with _errors(uri, "list"):
        for page in get_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                            Delimiter="/"):
            names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    return [n for n in names if n]


@contextmanager
def open_read(uri: str) -> Iterator[BinaryIO]:
    """The object's streaming body: bytes arrive as they are read, nothing is downloaded up front."""
    bucket, key = split_object(uri)
    with _errors(uri, "read"):
        body = get_client().get_object(Bucket=bucket, Key=key)["Body"]
    try:
        yield body
    finally:
        body.close()


def delete_file(uri: str) -> None:
    bucket, key = split_object(uri)
    with _errors(uri, "delete"):
        get_client().delete_object(Bucket=bucket, Key=key)


def delete_prefix(uri: str) -> None:
    """Delete the object `uri` and every object under `uri/` (never a sibling such as `uri10/`)."""
    bucket, key = split_uri(uri)
    keys = list(_keys(uri, recursive=True))
    if key:
        keys.append(key)  # deleting a missing key is not an error in S3
    client = get_client()
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i : i + 1000]]
        with _errors(uri, "delete"):
            response = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if response.get("Errors"):
            first = response["Errors"][0]
            raise StorageError(
                f"cannot delete {uri}: {len(response['Errors'])} objects failed, e.g. "
                f"s3://{bucket}/{first.get('Key')}: {first.get('Code')}"
            )
