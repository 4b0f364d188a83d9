"""Storage on both backends (a local directory and moto's S3 server over HTTP on loopback)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import boto3
import pytest
from pydantic import ValidationError

import infra.storage as st
from infra.settings import get_settings
from infra.storage import s3 as s3_backend

MiB = 1024 * 1024


def make_tree(root: Path, seed: int = 0) -> dict[str, bytes]:
    """A small directory with nested files and random content; returns relpath -> bytes."""
    rng = __import__("random").Random(seed)
    files = {
        "config.json": json.dumps({"seed": seed}).encode(),
        "shards/000.bin": rng.randbytes(3000),
        "shards/001.bin": rng.randbytes(17),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def moto_client():
    s3 = get_settings().s3
    return boto3.client(
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


# --- URIs -------------------------------------------------------------------------------------------

def test_join_uri_and_is_remote():
    assert st.join_uri("s3://b/p", "a", "b.txt") == "s3://b/p/a/b.txt"
    assert st.join_uri("s3://b/p/", "/a/", "b.txt") == "s3://b/p/a/b.txt"
    assert st.join_uri("s3://b", "k") == "s3://b/k"
    assert st.join_uri("/tmp/x", "a", "b.txt") == "/tmp/x/a/b.txt"
    assert st.join_uri("file:///tmp/x", "a") == "file:///tmp/x/a"
    assert st.is_remote("s3://b/k") and not st.is_remote("/tmp/x") and not st.is_remote("file:///tmp")


def test_file_scheme_reaches_the_same_files_as_the_plain_path(tmp_path):
    st.write_text(str(tmp_path / "a" / "x.txt"), "hello")
    assert st.read_text((tmp_path / "a" / "x.txt").as_uri()) == "hello"
    assert st.list_uris(tmp_path.as_uri()) == [tmp_path.as_uri() + "/a/x.txt"]


def test_unsupported_scheme_is_refused():
    with pytest.raises(st.StorageError, match="gs://b/k.*unsupported scheme"):
        st.read_bytes("gs://b/k")


# --- basic operations, both backends ----------------------------------------------------------------

def test_bytes_text_json_round_trip(store_base):
    data = os.urandom(1000)
    st.write_bytes(st.join_uri(store_base, "d", "blob.bin"), data)
    st.write_text(st.join_uri(store_base, "t.txt"), "héllo\n")
    st.write_json(st.join_uri(store_base, "j.json"), {"a": [1, 2.5, None], "b": "ü"})
    assert st.read_bytes(st.join_uri(store_base, "d", "blob.bin")) == data
    assert st.read_text(st.join_uri(store_base, "t.txt")) == "héllo\n"
    assert st.read_json(st.join_uri(store_base, "j.json")) == {"a": [1, 2.5, None], "b": "ü"}


def test_write_overwrites_existing_content(store_base):
    uri = st.join_uri(store_base, "x.txt")
    st.write_text(uri, "old")
    st.write_text(uri, "new")
    assert st.read_text(uri) == "new"
    assert st.list_uris(store_base) == [uri]  # no temporary files left behind


def test_put_and_get_file_round_trip(store_base, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(5000))
    uri = st.join_uri(store_base, "files", "src.bin")
    st.put_file(src, uri)
    dst = tmp_path / "out" / "deep" / "dst.bin"
    st.get_file(uri, dst)
    assert dst.read_bytes() == src.read_bytes()


def test_list_and_exists(store_base):
    for rel in ["b.txt", "a/1.txt", "a/sub/2.txt", "run10/x.txt"]:
        st.write_text(st.join_uri(store_base, rel), rel)
    j = lambda *p: st.join_uri(store_base, *p)
    assert st.list_uris(store_base) == sorted([j("b.txt"), j("a/1.txt"), j("a/sub/2.txt"), j("run10/x.txt")])
    assert st.list_uris(store_base, recursive=False) == [j("b.txt")]
    assert st.list_uris(j("a")) == [j("a/1.txt"), j("a/sub/2.txt")]
    assert st.list_uris(j("nothing-here")) == []
    assert st.exists(j("a/1.txt")) and st.exists(j("a"))
    assert not st.exists(j("a/3.txt")) and not st.exists(j("nothing-here"))
    assert st.list_dirs(store_base) == ["a", "run10"]  # directories only, not b.txt nor a/sub
    assert st.list_dirs(j("a")) == ["sub"]
    assert st.list_dirs(j("nothing-here")) == [] and st.list_dirs(j("b.txt")) == []


def test_delete_prefix_spares_siblings_with_the_same_name_prefix(store_base):
    for rel in ["run1/a.txt", "run1/sub/b.txt", "run10/c.txt"]:
        st.write_text(st.join_uri(store_base, rel), rel)
    st.delete_prefix(st.join_uri(store_base, "run1"))
    assert st.list_uris(store_base) == [st.join_uri(store_base, "run10/c.txt")]


def test_missing_uri_error_names_the_uri(store_base, tmp_path):
    uri = st.join_uri(store_base, "no", "such.bin")
    for call in (lambda: st.read_bytes(uri), lambda: st.get_file(uri, tmp_path / "x"),
                 lambda: st.open_read(uri).__enter__()):
        with pytest.raises(st.StorageError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert uri in str(info.value) and "does not exist" in str(info.value)


def test_streaming_read_of_a_file_above_the_multipart_threshold(store_base, tmp_path, patch_env):
    with patch_env(MOEFLOW_S3__MULTIPART_THRESHOLD_MB="5"):
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(6 * MiB + 123))
        uri = st.join_uri(store_base, "big.bin")
        st.put_file(big, uri)
        if st.is_remote(uri):
            bucket, key = s3_backend.split_uri(uri)
            etag = moto_client().head_object(Bucket=bucket, Key=key)["ETag"]
            assert etag.strip('"').endswith("-2"), f"expected a 2-part multipart upload, ETag {etag}"
        h, chunks = hashlib.sha256(), 0
        with st.open_read(uri) as stream:
            if st.is_remote(uri):
                assert type(stream).__name__ == "StreamingBody"
            while chunk := stream.read(MiB):
                assert len(chunk) <= MiB
                h.update(chunk)
                chunks += 1
        assert chunks >= 7 and h.hexdigest() == st.sha256_file(big)
        st.get_file(uri, tmp_path / "back.bin")  # ranged multipart download on S3
        assert st.sha256_file(tmp_path / "back.bin") == st.sha256_file(big)


# --- publish / fetch ----------------------------------------------------------------------------------

def test_publish_then_fetch_round_trip(store_base, tmp_path):
    files = make_tree(tmp_path / "src")
    uri = st.join_uri(store_base, "out")
    assert not st.is_published(uri) and st.read_manifest(uri) is None
    manifest = st.publish_dir(tmp_path / "src", uri, meta={"stage": "prep"})
    assert st.is_published(uri)
    assert st.read_manifest(uri) == manifest
    assert set(manifest.files) == set(files) and manifest.meta == {"stage": "prep"}
    assert manifest.files["shards/000.bin"].sha256 == hashlib.sha256(files["shards/000.bin"]).hexdigest()
    expected = [st.join_uri(uri, r) for r in [*files, "MANIFEST.json"]]
    assert st.list_uris(uri) == sorted(expected)

    fetched = st.fetch_dir(uri)
    if st.is_remote(uri):
        assert fetched == get_settings().home / "cache" / manifest.digest()
    else:
        assert fetched == Path(uri)  # verified in place, not copied
    for rel, data in files.items():
        assert (fetched / rel).read_bytes() == data


def test_fetch_reuses_a_complete_copy(store_base, tmp_path):
    make_tree(tmp_path / "src")
    uri = st.join_uri(store_base, "out")
    st.publish_dir(tmp_path / "src", uri)
    dest = st.fetch_dir(uri, tmp_path / "copy")
    assert dest == tmp_path / "copy" and (dest / "MANIFEST.json").is_file()
    st.delete_file(st.join_uri(uri, "shards/000.bin"))  # a second fetch must not need the source
    assert st.fetch_dir(uri, tmp_path / "copy") == dest
    with pytest.raises(st.IntegrityError, match="shards/000.bin.*missing"):
        st.fetch_dir(uri, tmp_path / "other-copy")


def test_corrupted_file_fails_verification_naming_it(store_base, tmp_path):
    files = make_tree(tmp_path / "src")
    uri = st.join_uri(store_base, "out")
    st.publish_dir(tmp_path / "src", uri)
    bad = bytearray(files["shards/000.bin"])
    bad[1234] ^= 0x01  # one byte changed, same size
    st.write_bytes(st.join_uri(uri, "shards/000.bin"), bytes(bad))
    with pytest.raises(st.IntegrityError) as info:
        st.fetch_dir(uri)
    assert st.join_uri(uri, "shards/000.bin") in str(info.value) and "SHA-256" in str(info.value)
    with pytest.raises(st.IntegrityError, match="shards/000.bin"):
        st.fetch_dir(uri, tmp_path / "copy")
    assert not (tmp_path / "copy" / "shards/000.bin").exists()  # bad bytes are not kept
    assert not (tmp_path / "copy" / "MANIFEST.json").exists()  # nor marked complete


def test_crash_before_manifest_leaves_the_uri_unpublished(store_base, tmp_path, monkeypatch):
    make_tree(tmp_path / "src")
    uri = st.join_uri(store_base, "out")
    real_put, calls = st.ops.put_file, []

    def dying_put(local, dest):
        calls.append(dest)
        if len(calls) == 3:
            raise RuntimeError("worker killed")
        real_put(local, dest)

    monkeypatch.setattr(st.ops, "put_file", dying_put)
    with pytest.raises(RuntimeError, match="worker killed"):
        st.publish_dir(tmp_path / "src", uri)
    assert st.list_uris(uri), "some files were written before the crash"
    assert st.read_manifest(uri) is None and not st.is_published(uri)
    with pytest.raises(st.NotPublishedError, match=f"{uri} is not published"):
        st.fetch_dir(uri)
    monkeypatch.setattr(st.ops, "put_file", real_put)
    st.publish_dir(tmp_path / "src", uri)  # a retry completes the publish
    assert st.is_published(uri)


def test_republishing_the_same_content_is_a_noop(store_base, tmp_path, monkeypatch):
    make_tree(tmp_path / "src")
    uri = st.join_uri(store_base, "out")
    first = st.publish_dir(tmp_path / "src", uri, meta={"k": 1})
    manifest_bytes = st.read_bytes(st.join_uri(uri, "MANIFEST.json"))

    def no_writes(*args):
        raise AssertionError(f"a no-op publish wrote {args}")

    for name in ("put_file", "write_bytes", "delete_file"):
        monkeypatch.setattr(st.ops, name, no_writes)
    again = st.publish_dir(tmp_path / "src", uri, meta={"k": 1})
    assert again == first and again.created == first.created
    assert st.read_bytes(st.join_uri(uri, "MANIFEST.json")) == manifest_bytes


def test_republishing_different_content_is_refused_unless_overwrite(store_base, tmp_path):
    make_tree(tmp_path / "src")
    uri = st.join_uri(store_base, "out")
    first = st.publish_dir(tmp_path / "src", uri)
    (tmp_path / "src" / "shards" / "001.bin").write_bytes(b"changed")
    with pytest.raises(st.StorageError, match="already published with different content"):
        st.publish_dir(tmp_path / "src", uri)
    assert st.read_manifest(uri) == first
    with pytest.raises(st.StorageError, match="already published with different content"):
        st.publish_dir(tmp_path / "src", uri, meta={"other": "meta"})

    (tmp_path / "src" / "empty.txt").unlink()
    second = st.publish_dir(tmp_path / "src", uri, overwrite=True)
    assert second.digest() != first.digest() and st.read_manifest(uri) == second
    assert st.join_uri(uri, "empty.txt") not in st.list_uris(uri)  # the replaced output's extra file is gone
    assert (st.fetch_dir(uri) / "shards/001.bin").read_bytes() == b"changed"


def test_manifest_paths_escaping_the_output_are_refused(store_base, tmp_path):
    entry = {"sha256": "0" * 64, "size": 1}
    for bad in ["../evil.txt", "a/../../evil.txt", "/etc/passwd", "a//b", "./a"]:
        with pytest.raises(ValidationError, match="relative POSIX path"):
            st.Manifest(files={bad: entry})
    uri = st.join_uri(store_base, "crafted")
    st.write_text(st.join_uri(uri, "evil.txt"), "x")
    crafted = {"files": {"../evil.txt": entry}, "meta": {}, "created": ""}
    st.write_json(st.join_uri(uri, "MANIFEST.json"), crafted)
    with pytest.raises(st.StorageError, match=r"\.\./evil\.txt"):
        st.fetch_dir(uri, tmp_path / "dest" / "inner")
    assert not (tmp_path / "dest" / "evil.txt").exists()


def test_digest_covers_files_and_meta_but_not_the_time():
    entry = {"sha256": "a" * 64, "size": 3}
    base = st.Manifest(files={"x": entry}, meta={"k": 1}, created="2024-01-01T00:00:00+00:00")
    assert st.Manifest(files={"x": entry}, meta={"k": 1}, created="2025-01-01").digest() == base.digest()
    assert st.Manifest(files={"x": entry}, meta={"k": 2}).digest() != base.digest()
    assert st.Manifest(files={"y": entry}, meta={"k": 1}).digest() != base.digest()


def test_publish_refuses_a_missing_source_dir(store_base, tmp_path):
    with pytest.raises(st.StorageError, match="not a directory"):
        st.publish_dir(tmp_path / "nope", st.join_uri(store_base, "out"))


# --- S3 client and secrets ------------------------------------------------------------------------------

def test_s3_client_follows_settings_and_is_cached(s3_env, patch_env):
    with patch_env(MOEFLOW_S3__MAX_ATTEMPTS="5"):
        client = s3_backend.get_client()
        assert s3_backend.get_client() is client
        config = client.meta.config
        assert config.retries["mode"] == "standard" and config.retries["total_max_attempts"] == 5
        assert config.s3["addressing_style"] == "path"
        assert config.request_checksum_calculation == "when_required"
        assert config.response_checksum_validation == "when_required"
        assert client.meta.endpoint_url == get_settings().s3.endpoint_url
        st.reset_clients()
        assert s3_backend.get_client() is not client


def test_secrets_never_appear_in_settings_or_errors(s3_env, tmp_path, patch_env):
    secret_key, secret_id = "SuperSecret-9f2c41e0-do-not-print", "AKIDSECRET77331"
    with patch_env(MOEFLOW_S3__ACCESS_KEY_ID=secret_id, MOEFLOW_S3__SECRET_ACCESS_KEY=secret_key):
        settings = get_settings()
        assert settings.s3.secret_access_key.get_secret_value() == secret_key  # really configured
        shown = [repr(settings), str(settings), json.dumps(settings.masked()), repr(s3_backend.get_client())]

        make_tree(tmp_path / "src")
        uri = st.join_uri(s3_env, "out")
        st.publish_dir(tmp_path / "src", uri)
        st.write_bytes(st.join_uri(uri, "shards/001.bin"), b"corrupt!" * 2 + b"!")
        bucket, _ = s3_backend.split_uri(s3_env)
        failing = [
            lambda: st.read_bytes(st.join_uri(s3_env, "missing")),
            lambda: st.read_bytes("s3://no-such-bucket-7f3a/x"),
            lambda: st.fetch_dir(st.join_uri(s3_env, "unpublished")),
            lambda: st.fetch_dir(uri),
            lambda: st.publish_dir(tmp_path / "src", uri, meta={"different": True}),
            lambda: st.put_file(tmp_path / "src", f"s3://{bucket}"),
        ]
        for call in failing:
            with pytest.raises(st.StorageError) as info:
                call()
            shown += [str(info.value), repr(info.value)]
    assert len(shown) == 4 + 2 * len(failing)
    for text in shown:
        assert secret_key not in text and secret_id not in text
