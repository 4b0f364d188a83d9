"""Release integrity against something the release cannot rewrite (issue 17, item 1).

A release rewritten *consistently* -- new weights, SHA256SUMS and MANIFEST.json recomputed to match -- passes
every self-referential check; it must fail against the digest the registry recorded, against
`--expect-digest`, and against an OpenSSF model-signing signature. Symlinks are refused, never followed.
Real files, a real MLflow registry on SQLite, real model-signing (skipped where the package is missing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from components.release import registry
from components.release.build import build_release, publish_release
from components.release.card import ReleaseCard
from components.release.verify import SUMS_NAME, sha256sums_text, verify_release
from flows.cli import main as cli
from infra import storage


def _rewrite_consistently(root: Path) -> None:
    """What an attacker with write access to the store does: change the weights, then make SHA256SUMS and
    MANIFEST.json agree with them again."""
    path = root / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k in sorted(tensors) if tensors[k].is_floating_point())
    tensors[name] = tensors[name] + 0.01
    os.chmod(path, 0o644)
    save_file(tensors, path, metadata={"format": "pt"})
    rels = [Path(u).relative_to(root).as_posix() for u in storage.list_uris(str(root))]
    rels = [r for r in rels if r not in (SUMS_NAME, storage.MANIFEST_NAME, "model.sig")]
    (root / SUMS_NAME).write_text(sha256sums_text(root, rels))
    old = storage.read_manifest(str(root))
    files = {r: storage.FileEntry(sha256=storage.sha256_file(root / r), size=(root / r).stat().st_size)
             for r in [*rels, SUMS_NAME, *(["model.sig"] if (root / "model.sig").exists() else [])]}
    (root / storage.MANIFEST_NAME).write_text(storage.Manifest(files=files, meta=old.meta).model_dump_json())


def _keys(tmp: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = tmp / "release-key.pem", tmp / "release-key.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _failed(report: dict) -> set[str]:
    return {c["name"] for c in report["checks"] if not c["ok"]}


def test_a_consistently_rewritten_release_fails_against_the_registry_digest_and_the_signature(
        make_model, tokenizer_dir, tmp_path, moeflow_home, capsys):
    pytest.importorskip("model_signing")
    model = make_model(seed=5)
    card = ReleaseCard(name="tiny", model_cfg=model.cfg, license_holder="Jane Doe", license_year=2031,
                       intended_use="tests", limitations=["tiny"])
    built = build_release(model, tmp_path / "rel", tokenizer_dir=tokenizer_dir, card=card)
    priv, pub = _keys(tmp_path)
    uri = str(tmp_path / "store" / "release")
    digest = publish_release(built["dir"], uri, signing_key=priv).digest()
    registry.register_release("tiny", release_uri=uri, release_sha256=digest, run_id=None, metrics={})

    intact = verify_release("models:/tiny@candidate", public_key=pub)
    assert intact["ok"], _failed(intact)
    assert {"registry digest", "signature"} <= {c["name"] for c in intact["checks"]}

    _rewrite_consistently(Path(uri))
    assert verify_release(uri)["ok"]  # self-consistent: the checks that cannot notice, still pass
    assert _failed(verify_release("models:/tiny@candidate")) == {"registry digest"}
    assert _failed(verify_release(uri, expect_digest=digest, public_key=pub)) == {"registry digest", "signature"}

    assert cli(["release", "verify", "models:/tiny@candidate", "--public-key", str(pub), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["ok"] and out["trusted_digest"] == digest and out["manifest_digest"] != digest


def test_symlinks_in_a_release_are_refused_when_publishing_and_verifying(make_model, tokenizer_dir, tmp_path,
                                                                         moeflow_home):
    secret = tmp_path / "outside.txt"
    secret.write_text("not part of any release\n")
    model = make_model(seed=6)
    card = ReleaseCard(name="tiny", model_cfg=model.cfg, license_holder="Jane Doe", license_year=2031,
                       intended_use="tests", limitations=["tiny"])
    built = build_release(model, tmp_path / "rel", tokenizer_dir=tokenizer_dir, card=card)
    (built["dir"] / "notes.txt").symlink_to(secret)
    with pytest.raises(storage.StorageError, match="notes.txt is a symlink"):
        publish_release(built["dir"], str(tmp_path / "store" / "a"))

    (built["dir"] / "notes.txt").unlink()
    uri = str(tmp_path / "store" / "b")
    publish_release(built["dir"], uri)
    weights = Path(uri) / "model.safetensors"
    real = tmp_path / "weights.safetensors"
    weights.rename(real)
    weights.symlink_to(real)  # same bytes, same digest: only the link itself is wrong
    report = verify_release(uri)
    assert not report["ok"] and "symlink" in json.dumps(report["checks"])
    with pytest.raises(storage.StorageError, match="symlink"):
        storage.fetch_dir(uri)
