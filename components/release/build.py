"""Build a release directory and publish it.

Layout (docs/architecture.md, "Contracts"): ``config.json``, ``generation_config.json``, ``model.safetensors``
(or shards + ``model.safetensors.index.json``), ``tokenizer.json`` + ``tokenizer_config.json``,
``README.md`` (model card), ``LICENSE`` (MIT) and ``SHA256SUMS`` (``sha256sum -c`` format, every other
file, written last). Publishing adds ``MANIFEST.json`` (every file's SHA-256 and size) after all of them,
so the release becomes visible complete or not at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from components.model import load_pretrained, model_info
from components.model.hf import export_hf
from infra import storage
from infra.contract import ConfigError

from .card import ReleaseCard, license_text, render_card
from .prompting import write_prompting
from .verify import SUMS_NAME, probe_inputs, sha256sums_text, sign_release

TOKENIZER_REQUIRED = ("tokenizer.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _check_tokenizer(tokenizer_dir: Path, vocab_size: int) -> None:
    missing = [n for n in TOKENIZER_REQUIRED if not (tokenizer_dir / n).is_file()]
    if missing:
        raise ConfigError(f"{tokenizer_dir}: the model has no {', '.join(missing)}; a release ships its tokenizer "
                          "(release a model written by pretraining, RL or distillation)")
    from tokenizers import Tokenizer

    try:
        n = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    except Exception as exc:  # tokenizers raises its own exception types for a bad file
        raise ConfigError(f"{tokenizer_dir / 'tokenizer.json'}: not a tokenizer: {exc}") from None
    if n > vocab_size:
        raise ConfigError(f"{tokenizer_dir / 'tokenizer.json'}: {n} tokens but the model's vocab_size is "
                          f"{vocab_size}; ids would fall outside the embedding")


def export_max_abs_diff(model: torch.nn.Module, release_dir: Path) -> float:
    """Largest |logit| difference between `model` and the release's weights reloaded by moeflow (float32)."""
    cfg = model.cfg
    ids = probe_inputs(cfg.vocab_size, cfg.max_position_embeddings)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            ref = model(ids.to(device)).float().cpu()
            got = load_pretrained(release_dir, dtype=torch.float32)(ids)
    finally:
        model.train(was_training)
    return float((ref - got).abs().max())


def build_release(model: torch.nn.Module, out_dir: str | Path, *, tokenizer_dir: str | Path, card: ReleaseCard,
                  dtype: torch.dtype | str = torch.float32, max_shard_bytes: int = 5 * 1024**3,
                  atol: float = 1e-4) -> dict[str, Any]:
    """Write the release of `model` into the new directory `out_dir` (see the module docstring).

    tokenizer_dir: directory holding ``tokenizer.json`` and ``tokenizer_config.json`` (a model directory).
    card: what the model card and LICENSE say. dtype: of the released weights (router weights and biases
    stay float32). The weights are reloaded and their logits compared with `model`'s on fixed inputs;
    in float32 a difference above `atol` raises RuntimeError (the export would be wrong).

    Returns ``{"dir", "files": {name: sha256}, "bytes", "export_max_abs_diff", "model_info"}``.
    """
    out = Path(out_dir)
    tok = Path(tokenizer_dir)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    cfg = model.cfg
    _check_tokenizer(tok, cfg.vocab_size)
    export_hf(model, out, tokenizer_dir=tok, dtype=dtype, max_shard_bytes=max_shard_bytes)
    try:
        write_prompting(out, card.evaluation)
        info = model_info(cfg)
        (out / "README.md").write_text(render_card(card, info), encoding="utf-8")
        (out / "LICENSE").write_text(license_text(card.license_holder, card.license_year), encoding="utf-8")
        diff = export_max_abs_diff(model, out)
        ref_fp32 = next(model.parameters()).dtype == torch.float32
        if dtype == torch.float32 and ref_fp32 and not diff <= atol:
            raise RuntimeError(f"the exported weights change the logits by {diff:.3g} > {atol:g}: export bug")
        names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        (out / SUMS_NAME).write_text(sha256sums_text(out, names), encoding="utf-8")  # last: covers the rest
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    files = {p.relative_to(out).as_posix(): storage.sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    return {"dir": out, "files": files, "bytes": sum((out / f).stat().st_size for f in files),
            "export_max_abs_diff": diff, "model_info": info}


def publish_release(local_dir: str | Path, uri: str, *, meta: dict[str, Any] | None = None,
                    signing_key: str | Path | None = None) -> storage.Manifest:
    """Publish a built release at `uri` (local path or s3://): files first, MANIFEST.json last. Returns the
    manifest; its ``digest()`` is the release's content hash (the registry's ``moeflow.release_sha256``).
    With `signing_key` (default: ``settings.release_signing_key``) the release is signed first (model.sig)."""
    from infra.settings import get_settings

    local = Path(local_dir)
    if not (local / SUMS_NAME).is_file():
        raise ValueError(f"{local} is not a built release (no {SUMS_NAME}); build it with build_release")
    json.dumps(meta or {})  # fail before uploading anything
    key = signing_key or get_settings().release_signing_key
    if key:
        if not Path(key).is_file():
            raise ValueError(f"release_signing_key {key}: no such file (a PEM elliptic-curve private key)")
        sign_release(local, key)
    return storage.publish_dir(local, uri, meta={"kind": "release", **(meta or {})}, overwrite=True)
