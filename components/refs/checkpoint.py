"""Checkpoints (resumable training state) and the published model (what later stages load).

Checkpoint layout, one published directory per step under `<stage output>/checkpoints/`::

    step_0000100/
      model.safetensors     the model's full state dict (weights + balancing biases), plain tensors
      config.json           the moeflow model config (so `load_model` reads a checkpoint too)
      optimizer.pt          the full (unsharded) optimizer state dict   -- torch.load(weights_only=True)
      trainer_state.pt      step, data position, scheduler, every RNG state of every rank, counters
                                                                        -- torch.load(weights_only=True)
      trainer_state.json    the same bookkeeping for people and tools: step, tokens, loss history
      MANIFEST.json         written last by `infra.storage.publish_dir`: the checkpoint exists from then on

A crash while saving leaves a directory without a manifest, which `list_checkpoints` ignores, so the
previous checkpoint stays the newest valid one. Pruning unpublishes (deletes the manifest) before
deleting files, so a half-deleted checkpoint is never taken for a complete one. Nothing here unpickles
arbitrary objects: weights are safetensors and every `torch.load` passes `weights_only=True`.

Model layout (`<stage output>/model/`, written by `save_model`, read by `load_model`)::

    model.safetensors  config.json (the model config, moeflow field names; `model_type` names a dense
    family)  tokenizer.json  tokenizer_config.json
    dataset.json (the dataset's index: special-token ids and strings, vocab, seq_len)  training.json
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from components.model.dense_config import AnyModelConfig
from infra import storage
from infra.contract import ConfigError

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "dataset.json")
_STEP_RE = re.compile(r"step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{step:07d}"


# --- tensors ----------------------------------------------------------------------------------------
def plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with their own storage each (safetensors refuses shared storages, e.g.
    tied embeddings): what `save_file` can write and any process can read."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        t = v.detach()
        full = getattr(t, "full_tensor", None)  # a DTensor that was not gathered
        if callable(full):
            t = full()
        out[k] = t.to("cpu").contiguous().clone()
    return out


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses, as weights_only-loadable data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoints ------------------------------------------------------------------------------------
def checkpoints_uri(output_uri: str) -> str:
    return storage.join_uri(output_uri, CHECKPOINTS_DIR)


def list_checkpoints(output_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of every complete (published) checkpoint under `output_uri`, oldest first."""
    base = checkpoints_uri(output_uri)
    found: dict[int, str] = {}
    for uri in storage.list_uris(base):
        parts = uri.replace("\\", "/").rstrip("/").split("/")
        if len(parts) >= 2 and parts[-1] == storage.MANIFEST_NAME:
            m = _STEP_RE.match(parts[-2])
            if m:
                found[int(m.group(1))] = storage.join_uri(base, parts[-2])
    return sorted(found.items())


def latest_checkpoint(output_uri: str) -> tuple[int, str] | None:
    ckpts = list_checkpoints(output_uri)
    return ckpts[-1] if ckpts else None


def write_checkpoint(local_dir: Path, *, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                     trainer_state: dict[str, Any], summary: dict[str, Any], model_cfg: AnyModelConfig) -> None:
    """Write a checkpoint's files into `local_dir` (emptied first); publishing is a separate step."""
    shutil.rmtree(local_dir, ignore_errors=True)
    local_dir.mkdir(parents=True)
    save_file(plain_state(model_state), str(local_dir / MODEL_FILE), metadata={"format": "pt"})
    (local_dir / CONFIG_FILE).write_text(json.dumps(model_cfg.model_dump(mode="json"), indent=2) + "\n")
    torch.save(optimizer_state, local_dir / OPTIMIZER_FILE)
    torch.save(trainer_state, local_dir / STATE_FILE)
    (local_dir / STATE_JSON).write_text(json.dumps(summary, indent=1) + "\n")


def publish_checkpoint(local_dir: Path, output_uri: str, step: int, meta: dict[str, Any] | None = None) -> str:
    """Publish `local_dir` as checkpoint `step` (files, then the manifest) and delete the local copy."""
    uri = storage.join_uri(checkpoints_uri(output_uri), step_name(step))
    storage.publish_dir(local_dir, uri, meta={"kind": "checkpoint", "step": step, **(meta or {})},
                        overwrite=True)
    shutil.rmtree(local_dir, ignore_errors=True)
    return uri


def prune_checkpoints(output_uri: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints, and any incomplete one older than the
    newest complete one. Returns the deleted URIs."""
    complete = list_checkpoints(output_uri)
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [uri for _, uri in complete[:-keep]] if len(complete) > keep else []
    base = checkpoints_uri(output_uri)
    complete_steps = {s for s, _ in complete}
    partial: set[str] = set()
    for uri in storage.list_uris(base):
        rel = uri[len(base):].replace("\\", "/").strip("/").split("/")
        m = _STEP_RE.match(rel[0]) if rel else None
        if m and int(m.group(1)) < newest and int(m.group(1)) not in complete_steps:
            partial.add(storage.join_uri(base, rel[0]))
    for uri in [*doomed, *sorted(partial)]:
        storage.delete_file(storage.join_uri(uri, storage.MANIFEST_NAME))  # unpublish first
        storage.delete_prefix(uri)
    return [*doomed, *sorted(partial)]


def fetch_checkpoint(uri: str) -> Path:
    """Local verified copy of a published checkpoint (in place when local)."""
    return storage.fetch_dir(uri)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The files of a checkpoint directory: model state, optimizer state, trainer state (all pickle-free
    or weights_only)."""
    return {
        "model": load_file(str(path / MODEL_FILE)),
        "optimizer": torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
        "trainer": torch.load(path / STATE_FILE, map_location="cpu", weights_only=True),
        "summary": json.loads((path / STATE_JSON).read_text()),
    }


# --- the published model ----------------------------------------------------------------------------
def save_model(model: nn.Module | dict[str, torch.Tensor], cfg: AnyModelConfig, out_dir: str | Path,
               tokenizer_dir: str | Path | None = None, *, extra: dict[str, Any] | None = None) -> Path:
    """Write a model directory `load_model` reads: `model.safetensors`, `config.json`, the tokenizer
    files and `dataset.json` of `tokenizer_dir` (a prepared dataset directory) when given, and
    `training.json` from `extra`. `model` is a module or its (full) state dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    save_file(plain_state(state), str(out / MODEL_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, out / name)
        if not (out / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{src} has no tokenizer.json")
    if extra is not None:
        (out / "training.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
    return out


def load_model(uri_or_dir: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[nn.Module, AnyModelConfig]:
    """(model in eval mode, its config) from a published model or checkpoint URI, or a local directory:
    one written by `save_model` (moeflow's layout), or a Hugging Face directory of a supported family
    (DeepSeek-V3, Llama, Qwen2: a release, an `export_hf`, a `transformers` `save_pretrained`). A URI with
    a manifest is fetched and verified first. A config or weights that do not fit are a ConfigError
    naming the directory."""
    from components.model import build_model, config_from_dict
    from components.model.dense_config import is_hf_config
    from components.model.hf import load_pretrained

    src = str(uri_or_dir)
    path = storage.fetch_dir(src) if storage.is_published(src) else Path(src.removeprefix("file://"))
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{uri_or_dir}: not a model directory (needs {CONFIG_FILE})")
    raw = json.loads((path / CONFIG_FILE).read_text())
    if is_hf_config(raw):
        try:
            model = load_pretrained(path, device=device, dtype=dtype or torch.float32)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"{uri_or_dir}: {exc}") from None
        return model.eval(), model.cfg
    if not (path / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{uri_or_dir}: not a moeflow model directory (needs {CONFIG_FILE} and {MODEL_FILE})")
    try:
        cfg = config_from_dict(raw)
    except ValueError as exc:
        raise ConfigError(f"{uri_or_dir}: {CONFIG_FILE}: {exc}") from None
    with torch.device("meta"):
        model = build_model(cfg)
    state = load_file(str(path / MODEL_FILE), device=str(device))
    model.load_state_dict(state, strict=True, assign=True)
    for moe in model.moe_layers():  # counters are not saved (non-persistent buffers)
        moe.expert_counts = torch.zeros(moe.n_experts, dtype=torch.int64, device=device)
    model.reset_expert_counts()
    if dtype is not None:
        model.to(dtype)
    return model.eval(), cfg
