"""A small pool of worker processes that run untrusted-input verifiers under a per-call timeout, confined.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot stop one running call. A stuck call can only
be ended by killing the executor's workers, which breaks the executor and fails every queued call, and a
call's clock cannot start when the call *starts* (only when it is queued). This pool keeps one pipe pair
per worker, starts each call's clock when the call is handed to an idle, ready worker, and on a timeout
kills and replaces just that worker; the other calls go on.

Why not `multiprocessing` workers: spawn/forkserver re-import the parent's `__main__`, so an unguarded
script, a notebook or a flow file would run again inside every worker. Workers here are fresh
interpreters (`python -I -c ...`) that receive the parent's `sys.path`, import `preload` modules (sympy)
before they report ready so that a heavy import never counts against a call's timeout, and stay warm
between batches. They start in their own session (a Ctrl-C aimed at the trainer does not kill them
mid-call; the pool kills their process group).

What a worker can reach (it runs verifiers on model-written text, so treat it as hostile):
- Environment: a clean one (PATH, LANG/LC_*, LD_LIBRARY_PATH; HOME and TMPDIR point at its work
  directory), so no MOEFLOW_*/AWS_* variable or other credential is inherited.
- Files: its working directory is a fresh, empty temporary directory, emptied after every call and
  removed when the worker ends. Where the kernel offers Landlock (Linux >= 5.13; probed, skipped
  otherwise), the worker may read only the interpreter, the code on `sys.path` and system libraries,
  may create, write, truncate or delete files only in its directory (and write /dev/null), may not open
  TCP connections (ABI >= 4), and cannot read other processes' memory or environment.
- Identity: when the pool runs as root, the worker drops to `unprivileged_uid` (default 65534, nobody;
  gid the same, no supplementary groups) before it reports ready, i.e. before any call runs. Under
  Landlock it keeps one capability, CAP_DAC_READ_SEARCH, so that it can still import code only root may
  read (an interpreter under /root); Landlock bounds what it reads. Without Landlock it keeps none, and
  a worker that cannot read its code stops with an error saying so. Not root: nothing to drop.
- Limits (setrlimit): address space (`memory_mb`), size of any file it writes (`file_size_mb`), open
  files (`open_files`), no core dumps.
- Protocol: requests (parent -> worker) are length-prefixed pickle frames of `(fn, args)`; replies
  (worker -> parent) are one JSON object per line, `{"status", "value", "detail"}`, so the parent never
  unpickles anything a worker wrote. A reply that is not valid JSON of that shape, longer than
  `_MAX_REPLY_BYTES`, or not expected is an "error" for the call (the worker is replaced); anything a
  verifier prints goes to stderr, never into the reply stream. A return value must be JSON-serializable
  (tuples come back as lists); otherwise the call is an "error".

Nothing here uses signals, so the pool works from any thread.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import json
import os
import pickle
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_readable
from typing import Any, BinaryIO, Literal

_STARTUP_FAILURES_ALLOWED = 3
_HEADER_BYTES = 8
_MAX_REPLY_BYTES = 1 << 20
_READ_CHUNK = 1 << 16
_REPLY_STATUSES = ("ready", "ok", "error")
_ENV_PASSED = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "LD_LIBRARY_PATH")
_WORKER_CODE = (
    "import json, sys; config = json.loads(sys.argv[1]); sys.path[:] = config['path']; "
    "from components.tasks.sandbox import _worker_main; _worker_main(config)"
)

Call = tuple[Callable[..., Any], tuple[Any, ...]]


@dataclass(frozen=True)
class SandboxOutcome:
    """Result of one call: status "ok" (value holds the return, as JSON gives it back), "timeout" or
    "error" (detail says why)."""

    status: Literal["ok", "timeout", "error"]
    value: Any = None
    detail: str = ""


class _ReplyError(ValueError):
    """A worker wrote something that is not a well-formed reply."""


# -- framing ------------------------------------------------------------------------------------------
def _write_frame(stream: BinaryIO, obj: Any) -> None:
    """Parent -> worker: a length-prefixed pickle (the worker trusts its parent, never the reverse)."""
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


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_reply(line: bytes) -> tuple[str, Any, str]:
    """(status, value, detail) of one reply line; _ReplyError if it is anything else."""
    try:
        reply = json.loads(line, parse_constant=_reject_constant)
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _ReplyError(f"reply is not JSON ({exc}): {line[:80]!r}") from None
    if (
        not isinstance(reply, dict)
        or set(reply) != {"status", "value", "detail"}
        or reply["status"] not in _REPLY_STATUSES
        or not isinstance(reply["detail"], str)
    ):
        raise _ReplyError(f"reply is not a {{status, value, detail}} object: {line[:80]!r}")
    return reply["status"], reply["value"], reply["detail"]


def _send_reply(stream: BinaryIO, status: str, value: Any = None, detail: str = "") -> None:
    """Worker -> parent: one JSON object on one line (json.dumps never emits a raw newline)."""
    try:
        line = json.dumps({"status": status, "value": value, "detail": detail}, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        reason = f"result is not JSON-serializable: {type(exc).__name__}: {exc}"[:500]
        line = json.dumps({"status": "error", "value": None, "detail": reason})
    stream.write(line.encode() + b"\n")
    stream.flush()


# -- confinement (worker side) --------------------------------------------------------------------------
# Landlock (linux/landlock.h): syscall numbers are the same on x86_64 and aarch64.
_LANDLOCK_SYSCALLS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_REMOVE_ANY = (1 << 4) | (1 << 5)  # REMOVE_DIR, REMOVE_FILE
_LL_MAKE_ANY = sum(1 << bit for bit in range(6, 13))  # MAKE_CHAR, _DIR, _REG, _SOCK, _FIFO, _BLOCK, _SYM
_LL_REFER, _LL_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
_LL_NET_TCP = (1 << 0) | (1 << 1)  # ABI 4: BIND_TCP, CONNECT_TCP
_LL_SCOPE = (1 << 0) | (1 << 1)  # ABI 6: ABSTRACT_UNIX_SOCKET, SIGNAL
_PR_SET_KEEPCAPS, _PR_SET_NO_NEW_PRIVS = 8, 38
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Read-only beside the code on sys.path: shared libraries, the loader's cache, and a few devices.
_SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom", os.devnull)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers to this process (0: none, e.g. not Linux, an old
    kernel, or a seccomp profile that blocks it)."""
    numbers = _LANDLOCK_SYSCALLS.get(platform.machine())
    if not sys.platform.startswith("linux") or numbers is None:
        return 0
    # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(0, _libc().syscall(ctypes.c_long(numbers[0]), None, ctypes.c_size_t(0), ctypes.c_uint32(1)))


def _readable_paths() -> list[str]:
    """What a confined worker may read: the interpreter, the code on sys.path, system libraries."""
    prefixes = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    return sorted({*prefixes, *sys.path, *_SYSTEM_READ_PATHS} - {""})


def _confine_files(workdir: str, abi: int) -> None:
    """Landlock for this thread and the threads it starts later (so call it before starting any): read
    only `_readable_paths()`, create/write/delete only beneath `workdir` (plus writing /dev/null); no TCP;
    with ABI >= 6 no signals or abstract-socket connections to processes outside the sandbox."""
    libc = _libc()
    create, add_rule, restrict_self = (ctypes.c_long(n) for n in _LANDLOCK_SYSCALLS[platform.machine()])
    file_rights = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | (_LL_TRUNCATE if abi >= 3 else 0)
    handled = file_rights | _LL_READ_DIR | _LL_REMOVE_ANY | _LL_MAKE_ANY | (_LL_REFER if abi >= 2 else 0)
    read_only = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
    attr = struct.pack("=QQQ", handled, _LL_NET_TCP if abi >= 4 else 0, _LL_SCOPE if abi >= 6 else 0)
    attr = attr[: 8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _check(libc.syscall(create, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)), "landlock")
    rules = [(path, read_only) for path in _readable_paths() if os.path.exists(path)]
    rules += [(workdir, handled), (os.devnull, _LL_WRITE_FILE)]
    try:
        for path, allowed in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:  # struct landlock_path_beneath_attr is packed: u64 allowed_access, s32 parent_fd
                if not os.path.isdir(path):
                    allowed &= file_rights  # a file takes file rights only
                rule = struct.pack("=Qi", allowed, fd)
                _check(libc.syscall(add_rule, ruleset, 1, rule, ctypes.c_uint32(0)), f"landlock rule {path}")
            finally:
                os.close(fd)
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(libc.syscall(restrict_self, ruleset, ctypes.c_uint32(0)), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def _drop_privileges(uid: int | None, keep_read_search: bool) -> None:
    """As root: switch to uid/gid `uid` with no supplementary groups; fails loudly if refused. Not root, or
    uid None: nothing to do.

    keep_read_search (only when Landlock already confines reads): keep CAP_DAC_READ_SEARCH and no other
    capability, so that the worker can still import code that only root may read (a Python installed
    under /root), while Landlock decides which files it may read at all. Without it, `uid` must be able to
    read the interpreter and sys.path, or the worker stops with an error that says so."""
    if uid is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    libc = _libc()
    code_dirs = [path for path in [os.path.dirname(os.__file__), *sys.path] if os.path.isdir(path)]
    if keep_read_search:
        _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if keep_read_search:  # effective = permitted = {CAP_DAC_READ_SEARCH}, nothing inheritable
        header = struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0)
        bit = 1 << _CAP_DAC_READ_SEARCH
        _check(libc.capset(header, struct.pack("=6I", bit, bit, 0, 0, 0, 0)), "capset")
        _check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError(f"sandbox worker could not drop root privileges to uid {uid}")
    if not keep_read_search:
        for path in code_dirs:  # listed as root: as `uid`, isdir() is False for a directory it cannot reach
            if not os.access(path, os.R_OK | os.X_OK):
                raise RuntimeError(
                    f"sandbox worker: uid {uid} cannot read {path}, which it needs to import code; install "
                    "Python and the code where other users can read them, or pass SandboxPool(unprivileged_uid=None)"
                )


def _set_limit(name: str, value: int | None) -> None:
    """Lower soft and hard limit `name` to `value` (never above the current hard limit); skipped where the
    OS does not have or enforce it (the timeout still applies)."""
    if value is None:
        return
    try:
        import resource

        which = getattr(resource, name)
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))
    except (ImportError, AttributeError, ValueError, OSError):
        pass


def _remove_tree(path: str) -> None:
    """Remove `path` (a worker's directory), even where a worker took away its own permissions; never
    follows a symlink."""
    if os.path.islink(path):
        os.unlink(path)
        return
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError:
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), 0o700)
        shutil.rmtree(path, ignore_errors=True)


def _empty_directory(path: str) -> None:
    with os.scandir(path) as entries:
        leftovers = [entry.path for entry in entries]
    for entry in leftovers:
        if os.path.isdir(entry) and not os.path.islink(entry):
            _remove_tree(entry)
        else:
            os.unlink(entry)


def _exit_when_orphaned(parent_pid: int) -> None:
    """Daemon thread: end this worker if the pool's process died without closing it (e.g. SIGKILL)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _worker_main(config: dict[str, Any]) -> None:
    """Worker: confine itself, report ready, then answer pickled (fn, args) requests with JSON replies."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from verifiers go to stderr, never into the reply stream
    requests = os.fdopen(os.dup(0), "rb")
    workdir = config["workdir"]
    memory_mb = config["memory_mb"]
    _set_limit("RLIMIT_AS", memory_mb * 1024 * 1024 if memory_mb else None)
    _set_limit("RLIMIT_FSIZE", config["file_size_mb"] * 1024 * 1024)
    _set_limit("RLIMIT_NOFILE", config["open_files"])
    _set_limit("RLIMIT_CORE", 0)
    for name in config["preload"]:
        importlib.import_module(name)
    abi = landlock_abi()
    if abi:
        _confine_files(workdir, abi)
    _drop_privileges(config["unprivileged_uid"], keep_read_search=abi > 0)
    threading.Thread(target=_exit_when_orphaned, args=(config["parent_pid"],), daemon=True).start()
    _send_reply(replies, "ready")
    while True:
        try:
            size = int.from_bytes(_read_exact(requests, _HEADER_BYTES), "big")
            data = _read_exact(requests, size)
        except EOFError:  # the pool closed the pipe (or the parent died): exit quietly
            return
        try:
            fn, args = pickle.loads(data)
            status, value, detail = "ok", fn(*args), ""
        except Exception as exc:  # MemoryError and RecursionError included: the worker survives them
            status, value, detail = "error", None, f"{type(exc).__name__}: {exc}"[:500]
        _send_reply(replies, status, value, detail)
        os.chdir(workdir)  # the next call starts in an empty working directory again
        _empty_directory(workdir)


# -- parent side ----------------------------------------------------------------------------------------
def _worker_env(workdir: str) -> dict[str, str]:
    env = {name: os.environ[name] for name in _ENV_PASSED if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update(HOME=workdir, TMPDIR=workdir)
    return env


class _Worker:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.workdir = tempfile.mkdtemp(prefix="moeflow-verifier-")
        uid = settings["unprivileged_uid"]
        if uid is not None and hasattr(os, "geteuid") and os.geteuid() == 0:
            os.chown(self.workdir, uid, uid)
        config = {
            **settings,
            "path": [os.path.abspath(p) for p in sys.path],  # the worker runs in its own directory
            "parent_pid": os.getpid(),
            "workdir": self.workdir,
        }
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-c", _WORKER_CODE, json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,
                cwd=self.workdir,
                env=_worker_env(self.workdir),
                start_new_session=True,
            )
        except BaseException:
            _remove_tree(self.workdir)
            raise
        self.requests, self.replies = self.process.stdin, self.process.stdout
        self.pending = bytearray()  # reply bytes read but not yet ended by a newline
        self.ready = False
        self.spawned_at = time.monotonic()
        self.task: int | None = None
        self.task_started = 0.0

    def read_replies(self) -> list[tuple[str, Any, str]]:
        """Parsed replies among the bytes available now (call when readable). EOFError if the worker
        closed its end, _ReplyError if it wrote something that is not a reply."""
        chunk = os.read(self.replies.fileno(), _READ_CHUNK)
        if not chunk:
            raise EOFError("worker pipe closed")
        self.pending += chunk
        *lines, rest = self.pending.split(b"\n")
        if len(rest) > _MAX_REPLY_BYTES:
            raise _ReplyError(f"reply longer than {_MAX_REPLY_BYTES} bytes")
        self.pending = bytearray(rest)
        return [_parse_reply(line) for line in lines]

    def kill(self) -> None:
        if self.process.poll() is None:
            try:  # the whole session: also any process the worker started
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, AttributeError):
                self.process.kill()
        self.process.wait(timeout=5)
        self.requests.close()
        self.replies.close()
        _remove_tree(self.workdir)


class SandboxPool:
    """Run module-level callables in confined worker processes, each call under its own timeout.

    workers: number of processes (started on first use, kept warm).
    memory_mb: address-space limit per worker (None: no limit).
    preload: modules each worker imports before it counts as ready.
    startup_timeout_s: how long a worker may take to become ready.
    file_size_mb: largest file a worker may write (RLIMIT_FSIZE; verifiers need no files).
    open_files: most file descriptors a worker may hold (RLIMIT_NOFILE).
    unprivileged_uid: uid and gid that workers switch to when the pool runs as root (None: stay root).

    Counters for monitoring and tests: `calls` (calls handed to workers) and `restarts` (workers replaced
    after a timeout, a crash or a malformed reply).
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        memory_mb: int | None = 2048,
        preload: Sequence[str] = ("sympy",),
        startup_timeout_s: float = 60.0,
        file_size_mb: int = 8,
        open_files: int = 64,
        unprivileged_uid: int | None = 65534,
    ) -> None:
        if workers < 1:
            raise ValueError(f"SandboxPool needs workers >= 1, got {workers}")
        if file_size_mb < 0:
            raise ValueError(f"SandboxPool needs file_size_mb >= 0, got {file_size_mb}")
        if open_files < 16:  # the interpreter itself holds a few: below this, workers cannot start
            raise ValueError(f"SandboxPool needs open_files >= 16, got {open_files}")
        self.n_workers = workers
        self.memory_mb = memory_mb
        self.preload = tuple(preload)
        self.startup_timeout_s = startup_timeout_s
        self._settings = {
            "memory_mb": memory_mb,
            "preload": list(self.preload),
            "file_size_mb": file_size_mb,
            "open_files": open_files,
            "unprivileged_uid": unprivileged_uid,
        }
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.calls = 0
        self.restarts = 0

    # -- lifecycle --------------------------------------------------------------------------------
    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self._settings)
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

        `fn` must be picklable by reference (a module-level function of a module on `sys.path`) and
        return something JSON-serializable.
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        with self._lock:
            if not self._workers:
                self._workers = [_Worker(self._settings) for _ in range(self.n_workers)]
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

    @staticmethod
    def _accept(worker: _Worker, reply: tuple[str, Any, str], results: list) -> None:
        status, value, detail = reply
        if status == "ready":
            if worker.ready:
                raise _ReplyError("worker reported ready twice")
            worker.ready = True
            return
        if worker.task is None:
            raise _ReplyError(f"reply {status!r} with no call in flight")
        results[worker.task] = SandboxOutcome(status, value, detail)  # type: ignore[arg-type]
        worker.task = None

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
                for reply in worker.read_replies():
                    self._accept(worker, reply, results)
            except (EOFError, OSError, _ReplyError) as exc:
                if worker.task is None:
                    failures += 1
                elif isinstance(exc, _ReplyError):
                    results[worker.task] = SandboxOutcome("error", detail=f"verifier worker: {exc}"[:500])
                else:
                    try:
                        code = worker.process.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        code = None
                    detail = f"verifier worker died (exit code {code})"
                    results[worker.task] = SandboxOutcome("error", detail=detail)
                self._replace(slot)
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
