"""One writer per content-addressed output: a lease beside it (`<output>.lease`) held while a job writes.

The lease is a small JSON record -- owner pid, host, process start time, a random token and a heartbeat
time -- created *exclusively*: locally with `O_CREAT | O_EXCL`, on S3 with a conditional create
(`If-None-Match: *`). A heartbeat thread rewrites it every `heartbeat_s` (on S3 only if its ETag is still
ours: `If-Match`). A second writer fails at once with `LeaseHeld`, naming the holder. A lease is *stale*
when its heartbeat is older than `ttl_s`, or when its owner ran on this host and that process is gone; a
stale lease is taken over atomically (local: rename it away, then create exclusively; S3: overwrite it
only if its ETag is unchanged), so two takers never both win.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from botocore.exceptions import ClientError

from infra.owner import alive, process_start

from . import ops, s3
from .errors import StorageError
from .local import local_path

log = logging.getLogger(__name__)
LEASE_SUFFIX = ".lease"


class LeaseHeld(StorageError):
    """Another live writer holds the output's lease."""


def lease_uri(output_uri: str) -> str:
    return str(output_uri).rstrip("/") + LEASE_SUFFIX


def _record(token: str) -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start": process_start(pid), "token": token,
            "heartbeat": time.time()}


def _stale(rec: dict[str, Any], ttl_s: float) -> str | None:
    """Why a lease record is stale, or None when its owner may still be writing."""
    age = time.time() - float(rec.get("heartbeat", 0))
    if age > ttl_s:
        return f"no heartbeat for {age:.0f} s (ttl {ttl_s:g} s)"
    if rec.get("host") == socket.gethostname() and not alive(int(rec.get("pid", -1)), rec.get("start")):
        return f"its owner pid {rec.get('pid')} on this host has exited"
    return None


def _describe(rec: dict[str, Any]) -> str:
    age = time.time() - float(rec.get("heartbeat", 0))
    return f"pid {rec.get('pid')} on host {rec.get('host')} (heartbeat {age:.0f} s ago)"


def _precondition(e: ClientError) -> bool:
    return str(e.response.get("Error", {}).get("Code", "")) in ("PreconditionFailed", "412",
                                                                "ConditionalRequestConflict")


class Lease:
    """`with Lease(output_uri): ...` -- hold the output's lease for the block (see the module docstring)."""

    def __init__(self, output_uri: str, *, ttl_s: float = 120.0, heartbeat_s: float = 10.0):
        self.uri = lease_uri(output_uri)
        self.output_uri = output_uri
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # -- backend primitives: create exclusively / read with version / replace if unchanged ------------------
    def _s3_put(self, rec: dict[str, Any], what: str, **condition: str | None) -> bool:
        """A conditional PUT of the lease (IfNoneMatch="*" or IfMatch=etag); False when the condition fails."""
        bucket, key = s3.split_object(self.uri)
        try:
            with s3._errors(self.uri, what):
                self._etag = s3.get_client().put_object(Bucket=bucket, Key=key, Body=json.dumps(rec).encode(),
                                                        **condition)["ETag"]
        except StorageError as e:
            if isinstance(e.__cause__, ClientError) and _precondition(e.__cause__):
                return False
            raise
        return True

    def _create(self, rec: dict[str, Any]) -> bool:
        data = json.dumps(rec).encode()
        if ops.is_remote(self.uri):
            return self._s3_put(rec, "create the lease", IfNoneMatch="*")
        path = local_path(self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(record, version): the ETag on S3; None, None when there is no lease."""
        try:
            if ops.is_remote(self.uri):
                bucket, key = s3.split_object(self.uri)
                with s3._errors(self.uri, "read the lease"):
                    obj = s3.get_client().get_object(Bucket=bucket, Key=key)
                    return json.loads(obj["Body"].read()), obj["ETag"]
            return json.loads(local_path(self.uri).read_bytes()), None
        except (FileNotFoundError, s3.NotFoundError):
            return None, None
        except ValueError:  # torn or foreign content: treat as stale after ttl by giving it no heartbeat
            return {"heartbeat": 0}, None

    def _take_over(self, rec: dict[str, Any], etag: str | None) -> bool:
        new = _record(self.token)
        if ops.is_remote(self.uri):
            return self._s3_put(new, "take over the lease", IfMatch=etag)
        path = local_path(self.uri)
        aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.stale")
        try:
            os.rename(path, aside)  # atomic: of several takers, one moves it
        except FileNotFoundError:
            return self._create(new)
        try:
            moved = json.loads(aside.read_bytes())
        except ValueError:
            moved = {"heartbeat": 0}
        if moved.get("token") != rec.get("token"):  # refreshed or taken over meanwhile: put it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create(new)

    # -- the lease ------------------------------------------------------------------------------------------
    def acquire(self) -> Lease:
        for _ in range(5):
            if self._create(_record(self.token)):
                break
            rec, etag = self._read()
            if rec is None:
                continue  # released meanwhile
            why = _stale(rec, self.ttl_s)
            if why is None:
                raise LeaseHeld(f"{self.output_uri} is being written by {_describe(rec)}; two writers of one "
                                f"output are refused -- wait for it to finish (or, if that process is gone, the "
                                f"lease {self.uri} is taken over after {self.ttl_s:g} s without a heartbeat)")
            if self._take_over(rec, etag):
                log.warning("took over the stale lease of %s: %s", self.output_uri, why)
                break
        else:
            raise LeaseHeld(f"{self.output_uri}: could not acquire the lease {self.uri} (contended)")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                rec, etag = self._read()
                if rec is None or rec.get("token") != self.token:
                    self.lost = True
                    log.error("lost the lease of %s (now %s)", self.output_uri, _describe(rec or {}))
                    return
                fresh = {**rec, "heartbeat": time.time()}
                if not ops.is_remote(self.uri):
                    ops.write_bytes(self.uri, json.dumps(fresh).encode())
                elif not self._s3_put(fresh, "renew the lease", IfMatch=etag):
                    self.lost = True
                    log.error("lost the lease of %s: it changed under us", self.output_uri)
                    return
            except Exception as exc:  # a missed beat is not fatal; ttl_s leaves room for several
                log.warning("lease heartbeat for %s failed: %s", self.output_uri, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        rec, _ = self._read()
        if rec is not None and rec.get("token") == self.token:
            ops.delete_file(self.uri)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lease(output_uri: str) -> dict[str, Any] | None:
    """The current lease record of an output (None when nobody holds it)."""
    return Lease(output_uri)._read()[0]


__all__ = ["LEASE_SUFFIX", "Lease", "LeaseHeld", "lease_uri", "read_lease"]
