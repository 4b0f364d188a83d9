"""`moeflow release verify URI`: is this release intact, and does it load and compute as moeflow does?

Checks, each reported (name, ok, detail) and none stopping the others:
1. ``manifest``: the release is published (``MANIFEST.json``, written last, parses).
2. ``sha256 <file>``: every file's SHA-256 against both ``MANIFEST.json`` and ``SHA256SUMS``; a file
   one lists and the other does not, or that is missing, fails; so does a file that neither lists.
3. ``layout``: config, generation config, safetensors weights (never a pickle format), tokenizer files,
   model card, LICENSE, SHA256SUMS; ``license``: the MIT text; ``config``: a supported ``model_type``
   (``deepseek_v3``, ``llama``, ``qwen2``) and its ``architectures`` class.
4. ``tokenizer``: ``tokenizer.json`` loads with ``tokenizers`` and with ``AutoTokenizer``, both encode a
   fixed text the same, and every id fits the model's vocabulary.
5. ``transformers load``: the family's class (``DeepseekV3ForCausalLM``, ``LlamaForCausalLM``,
   ``Qwen2ForCausalLM``) ``.from_pretrained(use_safetensors=True)`` with no missing,
   unexpected or mis-shaped tensors; ``moeflow load``: ``components.model.load_pretrained``.
6. ``chat template``: ``tokenizer_config.json`` has one and ``transformers`` renders a question as exactly
   the evaluation prompt (bos + ``format_prompt``); ``generation config``: the sampling settings are all
   there (temperature, top_p, max_new_tokens, do_sample) or, for an unevaluated release, none, and
   ``eos_token_id`` includes ``</answer>`` (where evaluation stops) when the tokenizer has it;
   ``model card``: ``huggingface_hub.ModelCard`` reads the front matter (license mit, ``model-index`` when
   there are results) and the card names no absolute local path.
7. ``logits``: both models, float32, on fixed inputs (seeded random ids and the tokenized text): the
   largest absolute difference must be at most ``atol`` and every logit finite.
8. ``registry digest``: the manifest's digest against one the release cannot rewrite -- the registry's
   ``moeflow.release_sha256`` tag for a ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) reference, or
   ``expect_digest`` (``--expect-digest``) for a directory. Without either, steps 1-7 only prove the release
   is self-consistent: a consistently rewritten release (weights, MANIFEST.json and SHA256SUMS) passes them.
9. ``signature``: with a public key, the OpenSSF ``model-signing`` signature (``model.sig`` in the release,
   or ``signature``) over every file but MANIFEST.json and the signature itself.
A remote release is downloaded into a temporary directory; a local one is read in place; symlinks and
non-regular files are refused, never followed. Library warnings raised while loading are captured into
the report (``warnings``), not printed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from components.model.dense_config import ARCHITECTURES
from infra import storage

SUMS_NAME = "SHA256SUMS"
SIGNATURE_NAME = "model.sig"  # OpenSSF model-signing bundle, written after SHA256SUMS (not listed in it)
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                  "LICENSE", SUMS_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PROBE_TEXT = "What is 12 + 30? <think>12 + 30 = 42</think> <answer>42</answer> The quick brown fox."
PROBE_SEED = 1234
_SUMS_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")

AddCheck = Callable[..., None]


# ---- fixed inputs (shared with build's export check) ------------------------------------------------
def probe_inputs(vocab_size: int, max_positions: int) -> torch.Tensor:
    """Seeded random token ids, shape (2, T) with T = min(24, max_positions)."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, (2, min(24, max_positions)), generator=g)


# ---- SHA256SUMS -------------------------------------------------------------------------------------
def sha256sums_text(root: Path, names: list[str]) -> str:
    """`sha256sum`-compatible lines (`<hex>  <path>`) for `names` (relative POSIX paths), sorted."""
    lines = []
    for rel in sorted(names):
        lines.append(f"{storage.sha256_file(root / rel)}  {rel}")
    return "\n".join(lines) + "\n"


def parse_sha256sums(text: str) -> tuple[dict[str, str], list[str]]:
    """({path: hex}, problems) from SHA256SUMS text; each problem names its line."""
    sums: dict[str, str] = {}
    problems = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = _SUMS_LINE.match(line)
        if not m:
            problems.append(f"{SUMS_NAME}:{i}: not '<sha256>  <path>'")
            continue
        digest, rel = m.groups()
        if rel in sums:
            problems.append(f"{SUMS_NAME}:{i}: {rel} listed twice")
        sums[rel] = digest
    return sums, problems


# ---- quiet libraries --------------------------------------------------------------------------------
class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def captured_library_output(sink: list[str]) -> Iterator[None]:
    """Collect transformers' log warnings and Python warnings into `sink` instead of stderr; no progress
    bars. Everything is restored afterwards."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # make transformers install its handler now, so we can swap it
    lib = logging.getLogger("transformers")
    saved = (lib.handlers[:], lib.propagate, lib.level)
    bar = hf_logging.is_progress_bar_enabled()
    lib.handlers = [_ListHandler(sink)]
    lib.propagate = False
    lib.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                sink.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        lib.handlers, lib.propagate = saved[0], saved[1]
        lib.setLevel(saved[2])
        if bar:
            hf_logging.enable_progress_bar()


def _err(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


# ---- steps ------------------------------------------------------------------------------------------
def _relpaths(uri: str) -> list[str]:
    prefix = storage.join_uri(uri, "x")[:-1]
    return [u[len(prefix):].replace("\\", "/") for u in storage.list_uris(uri)]


def _locate(uri: str, tmp: Path, add: AddCheck) -> tuple[Path | None, storage.Manifest | None, list[str]]:
    """(local directory, manifest, every file name present) -- downloading a remote release's listed files."""
    try:
        manifest = storage.read_manifest(uri)
    except storage.StorageError as exc:
        add("manifest", False, f"{storage.MANIFEST_NAME} is unreadable: {_err(exc)}", file=storage.MANIFEST_NAME)
        manifest = None
    else:
        if manifest is None:
            add("manifest", False, f"no {storage.MANIFEST_NAME}: not a published release (or its publish never "
                                   "finished)")
        else:
            add("manifest", True, f"{len(manifest.files)} files, digest {manifest.digest()[:16]}")
    try:
        present = [r for r in _relpaths(uri) if r != storage.MANIFEST_NAME]
    except storage.StorageError as exc:
        add("download", False, f"cannot list {uri}: {_err(exc)}")
        return None, manifest, []
    if not present and manifest is None:
        add("download", False, f"nothing at {uri}")
        return None, manifest, []
    if not storage.is_remote(uri):
        from infra.storage.local import local_path

        return local_path(uri), manifest, present
    wanted = set(present) & (set(manifest.files if manifest else {}) | {SUMS_NAME})
    if SUMS_NAME in present:
        with contextlib.suppress(storage.StorageError, OSError):
            sums, _ = parse_sha256sums(storage.read_text(storage.join_uri(uri, SUMS_NAME)))
            wanted |= set(sums) & set(present)
    for rel in sorted(wanted):
        try:
            storage.get_file(storage.join_uri(uri, rel), tmp / rel)
        except (storage.StorageError, OSError) as exc:
            add(f"download {rel}", False, _err(exc), file=rel)
    return tmp, manifest, present


def _check_files(root: Path, manifest: storage.Manifest | None, present: list[str], add: AddCheck) -> dict[str, str]:
    """Every SHA-256 against MANIFEST.json and SHA256SUMS. Returns the parsed SHA256SUMS."""
    sums: dict[str, str] = {}
    sums_path = root / SUMS_NAME
    if sums_path.is_file():
        try:
            sums, problems = parse_sha256sums(sums_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            sums, problems = {}, [f"{SUMS_NAME} is not UTF-8 text"]
        if problems:
            add(f"parse {SUMS_NAME}", False, "; ".join(problems[:5]), file=SUMS_NAME)
    listed_manifest = dict(manifest.files) if manifest else {}
    names = sorted(set(listed_manifest) | set(sums) | ({SUMS_NAME} if SUMS_NAME in present else set()))
    for rel in names:
        path = root / rel
        problems = []
        entry = listed_manifest.get(rel)
        if path.is_symlink() or (path.exists() and not path.is_file()):
            add(f"sha256 {rel}", False, "a symlink or not a regular file: refused, not followed", file=rel)
            continue
        if not path.is_file():
            add(f"sha256 {rel}", False, "missing (listed but not in the release)", file=rel)
            continue
        actual = storage.sha256_file(path)
        if manifest is not None and entry is None:
            problems.append(f"not listed in {storage.MANIFEST_NAME}")
        if entry is not None and entry.sha256 != actual:
            problems.append(f"SHA-256 {actual[:16]}... differs from {storage.MANIFEST_NAME}'s {entry.sha256[:16]}...")
        if entry is not None and entry.size != path.stat().st_size:
            problems.append(f"size {path.stat().st_size} differs from {storage.MANIFEST_NAME}'s {entry.size}")
        if rel not in (SUMS_NAME, SIGNATURE_NAME):
            if rel not in sums:
                problems.append(f"not listed in {SUMS_NAME}")
            elif sums[rel] != actual:
                problems.append(f"SHA-256 {actual[:16]}... differs from {SUMS_NAME}'s {sums[rel][:16]}...")
        add(f"sha256 {rel}", not problems, "; ".join(problems) or actual, file=rel)
    for rel in sorted(set(present) - set(names)):
        add(f"sha256 {rel}", False, f"not listed in {storage.MANIFEST_NAME} or {SUMS_NAME}: not part of the release",
            file=rel)
    return sums


def _check_layout(root: Path, present: list[str], add: AddCheck) -> bool:
    """Required files, safetensors only, MIT LICENSE, DeepseekV3 config. True when the weights can be loaded."""
    from .card import MIT_GRANT

    have = set(present)
    missing = [f for f in REQUIRED_FILES if f not in have]
    weights_ok = True
    if "model.safetensors.index.json" in have:
        try:
            shards = set(json.loads((root / "model.safetensors.index.json").read_text())["weight_map"].values())
            missing += sorted(s for s in shards if s not in have)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            missing.append(f"model.safetensors.index.json (unreadable: {_err(exc)})")
            weights_ok = False
    elif "model.safetensors" not in have:
        missing.append("model.safetensors")
        weights_ok = False
    pickles = sorted(r for r in have if r.lower().endswith(PICKLE_SUFFIXES))
    detail = []
    if missing:
        detail.append(f"missing {', '.join(missing)}")
    if pickles:
        detail.append(f"pickle-format files {', '.join(pickles)} (releases carry safetensors only)")
    add("layout", not detail, "; ".join(detail) or "all release files present, weights in safetensors")

    lic = root / "LICENSE"
    if lic.is_file():
        text = lic.read_text(encoding="utf-8", errors="replace")
        copyright_line = next((ln for ln in text.splitlines() if ln.startswith("Copyright (c)")), None)
        ok = text.startswith("MIT License") and MIT_GRANT in text and copyright_line is not None
        add("license", ok, copyright_line if ok else "LICENSE is not the MIT license text")

    cfg_ok = False
    try:
        cfg = json.loads((root / "config.json").read_text())
        arch = ARCHITECTURES.get(cfg.get("model_type"))
        cfg_ok = arch is not None and arch in (cfg.get("architectures") or [])
        add("config", cfg_ok, f"model_type {cfg.get('model_type')}, {arch}" if cfg_ok else
            f"config.json has model_type {cfg.get('model_type')!r}, architectures {cfg.get('architectures')} "
            f"(supported: {', '.join(f'{k} {v}' for k, v in ARCHITECTURES.items())})")
    except (OSError, ValueError, AttributeError) as exc:
        add("config", False, f"config.json: {_err(exc)}", file="config.json")
    return weights_ok and cfg_ok and (root / "config.json").is_file()


def _check_tokenizer(root: Path, vocab_size: int, add: AddCheck) -> torch.Tensor | None:
    """Tokenizer loads both ways and agrees; returns the probe text's ids (1, T) or None."""
    try:
        from tokenizers import Tokenizer
        from transformers import AutoTokenizer

        ids = Tokenizer.from_file(str(root / "tokenizer.json")).encode(PROBE_TEXT).ids
        auto = AutoTokenizer.from_pretrained(str(root))(PROBE_TEXT)["input_ids"]
    except Exception as exc:  # a corrupt file can fail in many ways; report it, never crash
        add("tokenizer", False, _err(exc), file="tokenizer.json")
        return None
    problems = []
    if list(auto) != list(ids):
        problems.append("AutoTokenizer and tokenizer.json encode the probe text differently")
    if not ids:
        problems.append("the probe text encodes to no tokens")
    elif max(ids) >= vocab_size:
        problems.append(f"token id {max(ids)} >= the model's vocab_size {vocab_size}")
    add("tokenizer", not problems, "; ".join(problems) or f"{len(ids)} tokens for the probe text, both loaders agree")
    return torch.tensor([ids]) if not problems else None


def _check_models(root: Path, atol: float, add: AddCheck, report: dict[str, Any]) -> None:
    import transformers

    from components.model import load_pretrained

    cfg = json.loads((root / "config.json").read_text())
    arch = ARCHITECTURES[cfg["model_type"]]  # _check_files passed the config check
    text_ids = _check_tokenizer(root, int(cfg.get("vocab_size", 0)), add)
    try:
        hf, info = getattr(transformers, arch).from_pretrained(str(root), dtype=torch.float32, use_safetensors=True,
                                                               output_loading_info=True)
        hf.eval()
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                                               "error_msgs")}
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:4]}" for k, v in bad.items())
        add("transformers load", not bad, detail or f"{arch}, safetensors, every tensor matched",
            file="model.safetensors" if bad else None)
        if bad:
            hf = None
    except Exception as exc:  # corrupt weights raise anything from SafetensorError to RuntimeError
        add("transformers load", False, _err(exc), file="model.safetensors")
        hf = None
    try:
        ours = load_pretrained(root, dtype=torch.float32).eval()
        add("moeflow load", True, "components.model.load_pretrained")
    except Exception as exc:
        add("moeflow load", False, _err(exc), file="model.safetensors")
        ours = None
    if hf is None or ours is None:
        add("logits", False, "not compared: a model did not load")
        return
    inputs = [probe_inputs(ours.cfg.vocab_size, ours.cfg.max_position_embeddings)]
    if text_ids is not None:
        inputs.append(text_ids[:, : ours.cfg.max_position_embeddings])
    worst, finite, shapes_ok = 0.0, True, True
    with torch.no_grad():
        for ids in inputs:
            a, b = ours(ids), hf(ids).logits
            if a.shape != b.shape:
                shapes_ok = False
                continue
            finite &= bool(torch.isfinite(a).all() and torch.isfinite(b).all())
            worst = max(worst, float((a.float() - b.float()).abs().max()))
    report["max_abs_diff"] = worst
    ok = shapes_ok and finite and worst <= atol
    detail = (f"max |moeflow - transformers| = {worst:.3g} {'<=' if worst <= atol else '>'} atol {atol:g} on "
              f"{len(inputs)} fixed input(s)")
    if not shapes_ok:
        detail = "logit shapes differ between moeflow and transformers"
    elif not finite:
        detail += "; non-finite logits"
    add("logits", ok, detail)


_ABSOLUTE_PATH = re.compile(r"(?:file://|`)/[^\s`]*")


def _check_prompting(root: Path, present: list[str], add: AddCheck) -> None:
    """The chat template, the generation config's sampling settings and the model card's front matter."""
    from components.tasks.problem import format_prompt

    from .prompting import SAMPLING_KEYS, STOP_TOKEN, stop_token_id

    if "tokenizer_config.json" in present:
        from transformers import AutoTokenizer

        question = "What is 12 + 30?"
        try:
            tok = AutoTokenizer.from_pretrained(root)
            got = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                          add_generation_prompt=True) if tok.chat_template else None
            want = (tok.bos_token or "") + format_prompt(question)
            add("chat template", got == want, "renders the evaluation prompt" if got == want else
                "no chat template" if got is None else f"renders {got!r}, not the evaluation prompt {want!r}",
                file="tokenizer_config.json")
        except Exception as exc:  # transformers' template errors have no common type
            add("chat template", False, f"cannot render: {_err(exc)}", file="tokenizer_config.json")
    if "generation_config.json" in present:
        gen = json.loads((root / "generation_config.json").read_text())
        keys = (*SAMPLING_KEYS, "do_sample")
        have = [k for k in keys if gen.get(k) is not None]
        ok = len(have) in (0, len(keys))
        detail = (("sampling: " + ", ".join(f"{k} {gen[k]}" for k in keys)) if have and ok else
                  "no sampling settings (unevaluated release)" if ok else
                  f"incomplete sampling settings: has {', '.join(have)} of {', '.join(keys)}")
        stop = stop_token_id(root) if "tokenizer.json" in present else None
        eos = gen.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if stop is not None and stop not in eos:
            ok, detail = False, f"eos_token_id {eos} lacks {STOP_TOKEN} ({stop}), where evaluation stops"
        add("generation config", ok, detail, file="generation_config.json")
    if "README.md" in present:
        from huggingface_hub import ModelCard

        try:
            card = ModelCard.load(root / "README.md")
            data = card.data.to_dict()
            problems = [] if data.get("license") == "mit" else [f"license {data.get('license')!r}"]
            problems += [f"absolute local path {m}" for m in _ABSOLUTE_PATH.findall(card.text)[:3]]
            detail = f"front matter: {', '.join(sorted(data))}"
            add("model card", not problems, "; ".join(problems) or detail, file="README.md")
        except Exception as exc:  # huggingface_hub raises ValueError or yaml errors
            add("model card", False, f"unreadable front matter: {_err(exc)}", file="README.md")


def _registry_digest(ref: str) -> tuple[str, str | None, str]:
    """(release URI, recorded digest or None, which model version) of a ``models:/`` reference."""
    from components.refs.models import REGISTRY_PREFIX, resolve_model_ref

    from .registry import RELEASE_SHA_TAG, _client

    body = ref[len(REGISTRY_PREFIX):]
    client = _client()
    if "@" in body:
        name, alias = body.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, version = body.rsplit("/", 1)
        mv = client.get_model_version(name, version)
    return resolve_model_ref(ref), (mv.tags or {}).get(RELEASE_SHA_TAG), f"{mv.name} version {mv.version}"


def _check_signature(root: Path, signature: str | Path | None, public_key: str | Path, add: AddCheck) -> None:
    sig = Path(signature) if signature else root / SIGNATURE_NAME
    if not sig.is_file():
        add("signature", False, f"no signature: {sig.name} is not in the release (sign it: release_signing_key)",
            file=SIGNATURE_NAME)
        return
    try:
        import model_signing
    except ImportError as exc:
        add("signature", False, f"cannot check the signature: {_err(exc)} (install model-signing)")
        return
    try:
        (model_signing.verifying.Config().use_elliptic_key_verifier(public_key=Path(public_key))
         .set_hashing_config(_hashing_config()).verify(root, sig))
    except Exception as exc:  # model-signing raises ValueError on a mismatch, others on a corrupt bundle
        add("signature", False, f"signature does not match {Path(public_key).name}: {_err(exc)}")
        return
    add("signature", True, f"signed by the key of {Path(public_key).name}; every file matches")


def _hashing_config():
    import model_signing

    return model_signing.hashing.Config().set_ignored_paths(paths=[storage.MANIFEST_NAME, SIGNATURE_NAME],
                                                            ignore_git_paths=False)


def sign_release(local_dir: str | Path, private_key: str | Path) -> Path:
    """Sign a built release directory with OpenSSF model-signing (an elliptic-curve PEM private key), into
    ``model.sig`` inside it; MANIFEST.json (written later, at publish) and the signature are not covered."""
    import model_signing

    root = Path(local_dir)
    (model_signing.signing.Config().use_elliptic_key_signer(private_key=Path(private_key))
     .set_hashing_config(_hashing_config()).sign(root, root / SIGNATURE_NAME))
    return root / SIGNATURE_NAME


def verify_release(uri: str, *, atol: float = 1e-4, expect_digest: str | None = None,
                   signature: str | Path | None = None, public_key: str | Path | None = None) -> dict[str, Any]:
    """Verify the release at `uri` -- a directory URI or ``models:/NAME@ALIAS`` (see the module docstring).
    Never raises for a bad release.

    Returns ``{"uri", "ok", "checks": [{"name", "ok", "detail", "file"?}], "failed_files": [...],
    "max_abs_diff": float | None, "warnings": [...], "manifest_digest": str | None, "trusted_digest": ...}``.
    """
    report: dict[str, Any] = {"uri": uri, "ok": False, "checks": [], "failed_files": [], "max_abs_diff": None,
                              "warnings": [], "manifest_digest": None, "trusted_digest": None}

    def add(name: str, ok: bool, detail: str, file: str | None = None) -> None:
        check = {"name": name, "ok": bool(ok), "detail": detail}
        if file:
            check["file"] = file
            if not ok and file not in report["failed_files"]:
                report["failed_files"].append(file)
        report["checks"].append(check)

    trusted = (expect_digest or "").strip().lower() or None
    source = "--expect-digest"
    if uri.startswith("models:/"):
        try:
            uri, recorded, source = _registry_digest(uri)
        except Exception as exc:  # unknown model/alias, unreachable registry
            add("registry digest", False, f"cannot read the registry's record of {report['uri']}: {_err(exc)}")
            return report
        report["release_uri"] = uri
        if recorded is None:
            add("registry digest", False, f"{source} has no moeflow.release_sha256 tag: nothing trusted to compare")
        elif trusted and trusted != recorded:
            add("registry digest", False, f"--expect-digest {trusted[:16]}... differs from the registry's "
                                          f"{recorded[:16]}... for {source}")
        trusted, source = recorded, f"the registry's moeflow.release_sha256 of {source}"
    report["trusted_digest"] = trusted
    with tempfile.TemporaryDirectory(prefix="moeflow-verify-") as tmp, \
            captured_library_output(report["warnings"]):
        try:
            root, manifest, present = _locate(uri, Path(tmp), add)
            if manifest is not None:
                report["manifest_digest"] = manifest.digest()
            if trusted and manifest is not None:
                same = manifest.digest() == trusted
                add("registry digest", same, f"manifest digest {manifest.digest()[:16]}... "
                                             f"{'matches' if same else 'differs from'} {source} ({trusted[:16]}...)")
            if root is not None and public_key is not None:
                _check_signature(root, signature, public_key, add)
            if root is not None:
                _check_files(root, manifest, present, add)
                layout_ok = _check_layout(root, present, add)
                _check_prompting(root, present, add)
                if layout_ok:
                    _check_models(root, atol, add, report)
        except Exception as exc:  # a bug or an unforeseen corruption: still a verdict, never a traceback
            add("verify", False, f"verification stopped: {_err(exc)}")
    report["ok"] = bool(report["checks"]) and all(c["ok"] for c in report["checks"])
    return report

