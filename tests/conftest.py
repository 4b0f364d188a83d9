"""Shared fixtures for every test.

- `moeflow_home`: a temporary MOEFLOW_HOME (settings re-read), so no test touches the repo's `.moeflow`.
- `s3_server` (session): moto's S3 server on 127.0.0.1 (a free port); yields its endpoint URL.
- `s3_env`: points moeflow's settings at `s3_server` with dummy credentials, creates a fresh bucket and
  yields `s3://<bucket>/base`; uses `moeflow_home` too.
- `patch_env`: the `patched_env(**vars)` context manager below (set/unset variables, reload settings).
- `store_base`: parametrized ["local", "s3"]; yields a base URI in a temporary directory or in a fresh
  bucket, and sets MOEFLOW_STORE_URI to it. A test that takes it runs once per backend.
- `one_thread`: torch on one thread for the test (autouse in the folders named in ONE_THREAD_DIRS, and
  everywhere under pytest-xdist, as `make test` runs).
- Very small models for the stage tests (distillation, evaluation): `problems` (120 arithmetic problems),
  `tok` (a 300-token BPE on them), `examples` (prompt/completion pairs), `config_of` (`small_config`),
  `make_model(seed, **overrides)`, `publish_model(model, name) -> URI`, `task_file` (a user JSONL of 6
  problems) and `module_home` (one MOEFLOW_HOME for a whole test module).

Each fixture that changes the environment restores it afterwards and clears `get_settings`' cache and
the storage clients both when it starts and when it ends.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# In-process Prefect logs to the console at interpreter exit, after pytest closed its streams.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# Prefect's own state (the ephemeral API's SQLite database) per test process, never the user's ~/.prefect: two
# test processes (pytest-xdist workers) must not share one database file.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="moeflow-test-prefect-"))

S3_REGION = "us-east-1"
S3_KEY = "testing"  # moto accepts any credentials


def reload_settings() -> None:
    """Make the next `get_settings()` re-read the environment and drop cached S3 clients."""
    from infra.settings import get_settings
    from infra.storage import reset_clients

    get_settings.cache_clear()
    reset_clients()


@contextmanager
def patched_env(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables; restore them and reload settings on exit."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_settings()
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_settings()


@pytest.fixture
def patch_env():
    """`with patch_env(MOEFLOW_S3__MAX_ATTEMPTS="3"): ...` — env changes scoped to the block."""
    return patched_env


@pytest.fixture
def moeflow_home(tmp_path_factory) -> Iterator[str]:
    """A fresh MOEFLOW_HOME directory (its path as a string)."""
    home = tmp_path_factory.mktemp("moeflow-home")
    with patched_env(MOEFLOW_HOME=str(home), MOEFLOW_STORE_URI=None):
        yield str(home)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of moto's S3 server, running in a thread on loopback for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: str, moeflow_home: str) -> Iterator[str]:
    """Settings pointed at moto with a new empty bucket; yields `s3://<bucket>/base`."""
    import boto3
    from botocore.config import Config

    env = {
        "MOEFLOW_S3__ENDPOINT_URL": s3_server,
        "MOEFLOW_S3__REGION": S3_REGION,
        "MOEFLOW_S3__ACCESS_KEY_ID": S3_KEY,
        "MOEFLOW_S3__SECRET_ACCESS_KEY": S3_KEY,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_PROFILE": None,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    bucket = f"moeflow-test-{uuid.uuid4().hex[:12]}"
    with patched_env(**env):
        client = boto3.client(
            "s3", endpoint_url=s3_server, region_name=S3_REGION,
            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )
        client.create_bucket(Bucket=bucket)
        yield f"s3://{bucket}/base"


@pytest.fixture(params=["local", "s3"])
def store_base(request, moeflow_home: str, tmp_path_factory) -> Iterator[str]:
    """A base URI on each backend in turn: a temporary directory, then a fresh moto bucket."""
    if request.param == "s3":
        base = request.getfixturevalue("s3_env")
    else:
        base = str(tmp_path_factory.mktemp("store"))
    with patched_env(MOEFLOW_STORE_URI=base):
        yield base


@pytest.fixture(scope="session")
def free_port():
    """`free_port()` -> a TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


# ---- one thread ----------------------------------------------------------------------------------
ONE_THREAD_DIRS = ("distill", "eval", "release", "rl")  # tests/<dir>/: tiny matrices, many processes


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared machine extra threads cost 10x."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


FIRST_DIRS = ("e2e",)  # the longest file first: `make test` gives it one worker from the start (pytest-xdist)


def pytest_collection_modifyitems(config, items):
    tests_dir = os.path.dirname(__file__)
    top = {id(item): os.path.relpath(str(item.path), tests_dir).split(os.sep)[0] for item in items}
    items.sort(key=lambda item: top[id(item)] not in FIRST_DIRS)  # stable: the order within is kept
    # Under `make test` (pytest-xdist, 2 workers on 2 cores) every test runs on one thread: the end-to-end
    # pipeline on one worker trains with one thread a stage (tests/e2e), and a second thread on the other
    # worker would take its core; 2-thread processes sharing 2 cores stall far more than they gain.
    everywhere = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    for item in items:
        if everywhere or top[id(item)] in ONE_THREAD_DIRS:
            item.fixturenames.insert(0, "one_thread")


# ---- very small models ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def problems():
    from components.tasks import make_split

    return make_split("arithmetic", 120, 0)


@pytest.fixture(scope="session")
def tok(problems):
    from components.data.config import TokenizerConfig
    from components.data.tokenizer import train_tokenizer

    return train_tokenizer([p.prompt + p.completion() for p in problems], TokenizerConfig(vocab_size=300))


@pytest.fixture(scope="session")
def examples(problems):
    return [{"prompt": p.prompt, "completion": p.completion()} for p in problems]


def small_config(**over):
    """A very small ModelConfig (2 dense layers unless overridden) with `over` on top."""
    from components.model import ModelConfig

    base = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
                num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=2,
                max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return ModelConfig(**{**base, **over})


@pytest.fixture(scope="session")
def config_of():
    """small_config(**overrides) -> a very small ModelConfig (2 dense layers unless overridden)."""
    return small_config


@pytest.fixture
def make_model(tok):
    from components.model import Transformer

    def make(seed: int = 0, **over):
        torch.manual_seed(seed)
        return Transformer(small_config(**{"vocab_size": tok.get_vocab_size(), **over}))

    return make


@pytest.fixture
def publish_model(tok, tmp_path):
    """publish(model, name) -> URI of the model published in the store (save_model layout + tokenizer)."""
    from components.data.tokenizer import save_tokenizer
    from components.refs.checkpoint import save_model
    from infra import storage
    from infra.settings import get_settings

    tok_dir = tmp_path / "tokenizer"
    save_tokenizer(tok, tok_dir, model_max_length=256)

    def publish(model, name: str) -> str:
        local = save_model(model, model.cfg, tmp_path / name, tok_dir)
        uri = storage.join_uri(get_settings().store_uri, "test", tmp_path.name, name, "model")
        storage.publish_dir(local, uri, meta={"kind": "model"})
        return uri

    return publish


@pytest.fixture
def task_file(problems, tmp_path):
    """A user task JSONL of 6 arithmetic problems (numeric verifier)."""
    import json

    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.question, "answer": p.answer, "verifier": "numeric"}) + "\n"
                            for p in problems[:6]))
    return path


@pytest.fixture(scope="module")
def module_home(tmp_path_factory) -> Iterator[str]:
    """One MOEFLOW_HOME (store + MLflow SQLite) for a whole test module: creating MLflow's database costs
    seconds, so the stage tests of a module share one (each uses its own model names and store paths)."""
    home = tmp_path_factory.mktemp("module-home")
    with patched_env(MOEFLOW_HOME=str(home), MOEFLOW_STORE_URI=None):
        yield str(home)
