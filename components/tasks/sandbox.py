"""A small pool of worker processes that run untrusted-input verifiers under a per-call timeout.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot stop one running call. A stuck call can only
be ended by killing the executor's workers, which breaks the executor and fails every queued call, and a
call's clock cannot start when the call *starts* (only when it is queued). This pool keeps one pipe pair
per worker, starts each call's clock when the call is handed to an idle, ready worker, and on a timeout
kills and replaces just that worker; the other calls go on.

Why not `multiprocessing` workers: spawn/forkserver re-import the parent's `__main__`, so an unguarded
script, a notebook or a flow file would run again inside every worker. Workers here are fresh
interpreters (`python -I -c ...`) that receive the parent's `sys.path` and speak length-prefixed pickle
frames over stdin/stdout (anything a verifier prints goes to stderr). They start in their own session
(a Ctrl-C aimed at the trainer does not kill them mid-call; the pool kills them), limit their address
space (`memory_mb`, where the OS supports RLIMIT_AS), import `preload` modules (sympy) before they report
ready so that a heavy import never counts against a call's timeout, and stay warm between batches.

Nothing here uses signals, so the pool works from any thread.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_readable
from typing import Any, BinaryIO, Literal

_STARTUP_FAILURES_ALLOWED = 3
_HEADER_BYTES = 8
_WORKER_CODE = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from components.tasks.sandbox import _worker_main; _worker_main()"
)

Call = tuple[Callable[..., Any], tuple[Any, ...]]


@dataclass(frozen=True)
class SandboxOutcome:
    """Result of one call: status "ok" (value holds the return), "timeout" or "error" (detail says why)."""

    status: Literal["ok", "timeout", "error"]
    value: Any = None
    detail: str = ""


# -- framing ------------------------------------------------------------------------------------------
def _write_frame(stream: BinaryIO, obj: Any) -> None:
    payload = pickle.dumps(obj)
    stream.write(len(payload).to_bytes(_HEADER_BYTES, "big") + payload)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise EOFError("worker pipe closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_frame(stream: BinaryIO) -> Any:
    size = int.from_bytes(_read_exact(stream, _HEADER_BYTES), "big")
    return pickle.loads(_read_exact(stream, size))


# -- worker side ----------------------------------------------------------------------------------------
def _limit_memory(memory_mb: int | None) -> None:
    if not memory_mb:
        return
    try:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not enforced on this OS: the timeout still applies
        pass


def _exit_when_orphaned(parent_pid: int) -> None:
    """Daemon thread: end this worker if the pool's process died without closing it (e.g. SIGKILL)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _worker_main() -> None:
    """Worker loop: an init frame (parent pid, memory_mb, preload), then (fn, args) -> (status, value, detail)."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from verifiers go to stderr, never into the reply stream
    requests = os.fdopen(os.dup(0), "rb")
    parent_pid, memory_mb, preload = _read_frame(requests)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    _limit_memory(memory_mb)
    for name in preload:
        importlib.import_module(name)
    _write_frame(replies, ("ready", None, ""))
    while True:
        try:
            size = int.from_bytes(_read_exact(requests, _HEADER_BYTES), "big")
            data = _read_exact(requests, size)
        except EOFError:  # the pool closed the pipe (or the parent died): exit quietly
            return
        try:
            fn, args = pickle.loads(data)
            reply = ("ok", fn(*args), "")
        except Exception as exc:  # MemoryError and RecursionError included: the worker survives them
            reply = ("error", None, f"{type(exc).__name__}: {exc}"[:500])
        try:
            _write_frame(replies, reply)
        except Exception as exc:  # an unpicklable return value
            _write_frame(replies, ("error", None, f"result could not be pickled: {exc}"[:500]))


# -- parent side ----------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, memory_mb: int | None, preload: tuple[str, ...]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-c", _WORKER_CODE, json.dumps([p or os.getcwd() for p in sys.path])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,
        )
        self.requests, self.replies = self.process.stdin, self.process.stdout
        self.ready = False
        self.spawned_at = time.monotonic()
        self.task: int | None = None
        self.task_started = 0.0
        _write_frame(self.requests, (os.getpid(), memory_mb, preload))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        self.requests.close()
        self.replies.close()


class SandboxPool:
    """Run module-level callables in worker processes, each call under its own timeout.

    workers: number of processes (started on first use, kept warm).
    memory_mb: address-space limit per worker (None: no limit).
    preload: modules each worker imports before it counts as ready.
    startup_timeout_s: how long a worker may take to become ready.

    Counters for monitoring and tests: `calls` (calls handed to workers) and `restarts` (workers replaced
    after a timeout or a crash).
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        memory_mb: int | None = 2048,
        preload: Sequence[str] = ("sympy",),
        startup_timeout_s: float = 60.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"SandboxPool needs workers >= 1, got {workers}")
        self.n_workers = workers
        self.memory_mb = memory_mb
        self.preload = tuple(preload)
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.calls = 0
        self.restarts = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self.memory_mb, self.preload)
        self.restarts += 1

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers = []

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running ----------------------------------------------------------------------------------
    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> SandboxOutcome:
        return self.run_many([(fn, args)], timeout_s)[0]

    def run_many(self, calls: Sequence[Call], timeout_s: float) -> list[SandboxOutcome]:
        """Run each (fn, args) in a worker; each call gets `timeout_s` seconds from when it starts.

        `fn` must be picklable by reference (a module-level function of a module on `sys.path`).
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        with self._lock:
            if not self._workers:
                self._workers = [_Worker(self.memory_mb, self.preload) for _ in range(self.n_workers)]
            try:
                return self._run_locked(calls, timeout_s)
            except BaseException:  # e.g. KeyboardInterrupt: in-flight calls would answer the next batch
                for worker in self._workers:
                    worker.kill()
                self._workers = []
                raise

    def _busy(self) -> bool:
        return any(w.task is not None for w in self._workers)

    def _run_locked(self, calls: Sequence[Call], timeout_s: float) -> list[SandboxOutcome]:
        results: list[SandboxOutcome | None] = [None] * len(calls)
        queue = deque(range(len(calls)))
        startup_failures = 0
        while queue or self._busy():
            self._dispatch(calls, queue, results)
            if startup_failures > _STARTUP_FAILURES_ALLOWED:
                detail = f"sandbox workers failed to start {startup_failures} times (see stderr)"
                for index in queue:
                    results[index] = SandboxOutcome("error", detail=detail)
                queue.clear()
                if not self._busy():
                    break
            startup_failures += self._collect(results, timeout_s)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _dispatch(self, calls: Sequence[Call], queue: deque[int], results: list) -> None:
        """Hand queued calls to idle, ready workers; a call's clock starts here."""
        for slot, worker in enumerate(self._workers):
            while worker.ready and worker.task is None and queue:
                index = queue.popleft()
                try:
                    _write_frame(worker.requests, calls[index])
                except (pickle.PicklingError, TypeError, AttributeError) as exc:
                    results[index] = SandboxOutcome("error", detail=f"call could not be pickled: {exc}")
                    continue
                except OSError:  # died while idle: run the call on its replacement
                    queue.appendleft(index)
                    self._replace(slot)
                    break
                worker.task, worker.task_started = index, time.monotonic()
                self.calls += 1

    def _collect(self, results: list, timeout_s: float) -> int:
        """Wait for the next reply or deadline; record results. Returns new startup failures."""
        failures = 0
        waiting = [w for w in self._workers if w.task is not None or not w.ready]
        deadlines = [
            w.task_started + timeout_s if w.task is not None else w.spawned_at + self.startup_timeout_s for w in waiting
        ]
        timeout = max(0.0, min(deadlines) - time.monotonic())
        readable = wait_readable([w.replies for w in waiting], timeout=timeout)
        for slot, worker in enumerate(self._workers):
            if worker.replies not in readable:
                continue
            try:
                status, value, detail = _read_frame(worker.replies)
            except (EOFError, OSError, pickle.UnpicklingError):
                if worker.task is None:
                    failures += 1
                else:
                    try:
                        code = worker.process.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        code = None
                    detail = f"verifier worker died (exit code {code})"
                    results[worker.task] = SandboxOutcome("error", detail=detail)
                self._replace(slot)
                continue
            if status == "ready":
                worker.ready = True
            else:
                results[worker.task] = SandboxOutcome(status, value, detail)
                worker.task = None
        now = time.monotonic()
        for slot, worker in enumerate(self._workers):
            if worker.task is not None and now - worker.task_started >= timeout_s:
                results[worker.task] = SandboxOutcome("timeout", detail=f"no result within {timeout_s:g} s")
                self._replace(slot)
            elif not worker.ready and now - worker.spawned_at >= self.startup_timeout_s:
                failures += 1
                self._replace(slot)
        return failures


_default: SandboxPool | None = None
_default_lock = threading.Lock()


def default_sandbox() -> SandboxPool:
    """The process-wide pool used when a caller passes none (2 workers at most; closed at exit)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SandboxPool(workers=max(1, min(2, os.cpu_count() or 1)))
            atexit.register(_default.close)
        return _default
