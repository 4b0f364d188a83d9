"""Tokenizer helpers shared by training, RL, distillation and evaluation: how text becomes the token ids a
model sees, for a `tokenizers.Tokenizer` and a `transformers` tokenizer alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (a `tokenizers.Tokenizer` or a transformers one)."""
    if hasattr(tokenizer, "encode_batch"):
        return [list(e.ids) for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    out = []
    for t in texts:
        e = tokenizer.encode(t, add_special_tokens=False)
        out.append(list(getattr(e, "ids", e)))
    return out


def encode_prompts(tokenizer: Any, prompts: Sequence[str], bos_id: int | None) -> list[list[int]]:
    """`[bos] + prompt tokens`: the form prompts have in pretraining rows, SFT and evaluation."""
    head = [] if bos_id is None else [bos_id]
    return [head + ids for ids in encode_texts(tokenizer, prompts)]


def token_id(tokenizer: Any, text: str) -> int | None:
    """Id of a single-token string (e.g. "</answer>"), None when the tokenizer has no such token."""
    fn = getattr(tokenizer, "token_to_id", None) or getattr(tokenizer, "convert_tokens_to_ids", None)
    tid = fn(text) if fn else None
    return tid if isinstance(tid, int) and tid >= 0 else None


def special_ids(model: Any) -> tuple[int | None, int | None, int]:
    """(bos, eos, pad) of the model config; pad falls back to eos (padding is never trained on)."""
    cfg = model.cfg
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0)
    return cfg.bos_token_id, eos, pad
