"""The verifier sandbox keeps secrets and the filesystem out: real worker processes, real probes.

Each probe below is a module-level function that a worker imports and runs as untrusted code would. Checks
that only hold with a protection this machine may lack are tied to it by name: the uid drop needs root,
confining writes to the temp directory (world-writable /tmp included) needs Landlock.
"""

import ctypes
import fcntl
import os
import pickle
import stat
import struct
import tempfile
import uuid

import pytest

from components.tasks import VERIFIERS, Problem, SandboxPool, Verifier, verify
from components.tasks.sandbox import landlock_abi

ROOT = os.geteuid() == 0
LANDLOCK = landlock_abi() > 0
SECRET = f"s3cr3t-{uuid.uuid4().hex}"


# -- probes (run inside workers) ------------------------------------------------------------------------
def _environment():
    return dict(os.environ)


def _read(path):
    with open(path) as f:
        return f.read()


def _write(path, n_bytes=5):
    with open(path, "wb") as f:
        f.write(b"x" * n_bytes)
    return os.path.abspath(path)


def _listdir():
    return [os.getcwd(), sorted(os.listdir("."))]


def _open_many(n):
    return len([os.open(os.devnull, os.O_RDONLY) for _ in range(n)])


def _identity():
    return [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]


def _capabilities():
    header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0))
    data = ctypes.create_string_buffer(24)
    assert ctypes.CDLL(None, use_errno=True).capget(header, data) == 0
    effective, permitted, inheritable = struct.unpack("=6I", data.raw)[:3]
    return [effective, permitted, inheritable]


def _become_root():
    os.setuid(0)
    return "became root"


class _CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_to_reply_pipe(data):
    """Write `data` into every pipe open for writing except stdout/stderr: the reply stream is among them."""
    for fd in range(3, 64):
        try:
            mode, flags = os.fstat(fd).st_mode, fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue
        if stat.S_ISFIFO(mode) and flags & os.O_ACCMODE == os.O_WRONLY:
            os.write(fd, data)


def _forge_pickle_reply(marker):
    """A pickle frame that creates `marker` if the parent ever unpickles it."""
    payload = pickle.dumps(_CreatesFileWhenUnpickled(marker))
    _write_to_reply_pipe(len(payload).to_bytes(8, "big") + payload + b"\n")
    return "forged"


def _forging_check(answer, reference, tolerance, meta):
    """A sandboxed verifier whose worker answers for it with well-formed JSON of the wrong shape."""
    _write_to_reply_pipe(b'{"status": "ok", "value": "trust me", "detail": ""}\n')
    return True, "real answer"


def _unserializable():
    return {1, 2}


# -- tests ----------------------------------------------------------------------------------------------
@pytest.fixture
def pool(monkeypatch):
    """A fresh pool, started after the secrets are planted in this process's environment."""
    monkeypatch.setenv("MOEFLOW_S3__SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with SandboxPool(workers=1, preload=(), file_size_mb=1, open_files=32) as pool:
        yield pool


def test_worker_environment_holds_no_secret(pool):
    outcome = pool.run(_environment, timeout_s=10)
    assert outcome.status == "ok", outcome
    env = outcome.value
    assert SECRET not in env.values()
    assert not [name for name in env if name.startswith(("MOEFLOW_", "AWS_"))], env
    assert set(env) <= {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "LD_LIBRARY_PATH", "HOME", "TMPDIR"}, env
    assert env["HOME"] == env["TMPDIR"] == pool.run(os.getcwd, timeout_s=10).value


@pytest.mark.skipif(not (ROOT or LANDLOCK), reason="same user and no Landlock: nothing stops it")
def test_worker_cannot_read_the_parent_environment_or_private_files(pool, tmp_path):
    private = tmp_path / "credentials"
    private.write_text(SECRET)
    private.chmod(0o600)
    for path in (f"/proc/{os.getpid()}/environ", str(private)):
        outcome = pool.run(_read, path, timeout_s=10)
        assert outcome.status == "error" and "Permission" in outcome.detail, (path, outcome)


def test_worker_writes_only_in_its_temp_dir_which_is_emptied_and_removed(tmp_path):
    outside = [tmp_path / "escaped"]  # private to this process's user
    if LANDLOCK:
        outside.append(os.path.join(tempfile.gettempdir(), f"escaped-{uuid.uuid4().hex}"))  # world-writable
    try:
        with SandboxPool(workers=1, preload=()) as pool:
            inside = pool.run(_write, "inside.txt", timeout_s=10)
            assert inside.status == "ok", inside
            workdir = os.path.dirname(inside.value)
            assert workdir.startswith(tempfile.gettempdir()) and workdir != os.getcwd()
            assert pool.run(_listdir, timeout_s=10).value == [workdir, []]  # emptied after the call
            for path in outside:
                outcome = pool.run(_write, str(path), timeout_s=10)
                assert outcome.status == "error" and "Permission" in outcome.detail, (path, outcome)
                assert not os.path.exists(path)
            assert os.path.isdir(workdir)
        assert not os.path.exists(workdir)
    finally:
        for path in outside:
            if os.path.exists(path):
                os.unlink(path)


def test_file_size_and_open_file_limits_hold(pool):
    assert pool.run(_write, "small", 512 * 1024, timeout_s=10).status == "ok"
    big = pool.run(_write, "big", 2 * 1024 * 1024, timeout_s=10)
    assert big.status == "error" and "File too large" in big.detail, big
    assert pool.run(_open_many, 10, timeout_s=10).value == 10
    many = pool.run(_open_many, 100, timeout_s=10)
    assert many.status == "error" and "Too many open files" in many.detail, many


def test_a_reply_that_is_not_json_is_an_error_and_never_unpickled(pool, tmp_path):
    marker = tmp_path / "unpickled"
    restarts = pool.restarts
    outcome = pool.run(_forge_pickle_reply, str(marker), timeout_s=10)
    assert outcome.status == "error" and "not JSON" in outcome.detail, outcome
    assert not marker.exists()
    assert pool.restarts == restarts + 1  # the worker that forged it is replaced ...
    assert pool.run(abs, -2, timeout_s=10).value == 2  # ... and the pool goes on


def test_a_forged_verifier_reply_of_the_wrong_shape_is_an_error_not_a_score(pool, monkeypatch):
    monkeypatch.setitem(VERIFIERS, "test_forge", Verifier("test_forge", _forging_check, sandboxed=True))
    result = verify(_problem("1", "test_forge"), "<answer>1</answer>", sandbox=pool)
    assert result.status == "error" and result.correct is None and "malformed" in result.detail, result


def test_a_return_value_that_is_not_json_is_an_error(pool):
    outcome = pool.run(_unserializable, timeout_s=10)
    assert outcome.status == "error" and "not JSON-serializable" in outcome.detail, outcome


@pytest.mark.skipif(not ROOT, reason="privileges are dropped only when the pool runs as root")
def test_worker_does_not_run_as_root(pool):
    assert pool.run(_identity, timeout_s=10).value == [65534, 65534, 65534, 65534, []]
    for capabilities in pool.run(_capabilities, timeout_s=10).value:  # at most CAP_DAC_READ_SEARCH
        assert capabilities & ~(1 << 2) == 0, capabilities
    outcome = pool.run(_become_root, timeout_s=10)
    assert outcome.status == "error" and "PermissionError" in outcome.detail, outcome


def _problem(reference, verifier, tolerance=None):
    return Problem(
        family="test", id="t", question="q", answer=reference, prompt="Q: q\nA:", solution=None,
        verifier=verifier, tolerance=tolerance,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sympy_pool():
    with SandboxPool(workers=1) as pool:
        yield pool


@pytest.mark.parametrize("answer", ["1e999", "-1e999", "inf", "-inf", "nan", "9" * 100 + "e999", "10^400"])
@pytest.mark.parametrize(("verifier", "tolerance"), [("numeric", None), ("numeric", 0.5), ("symbolic", None),
                                                     ("symbolic", 1e-4), ("exact", None)])  # fmt: skip
def test_overflowing_numbers_are_wrong_answers(sympy_pool, answer, verifier, tolerance):
    problem = _problem("5", verifier, tolerance)
    result = verify(problem, f"<answer>{answer}</answer>", sandbox=sympy_pool)
    assert result.status == "ok" and result.correct is False, result
