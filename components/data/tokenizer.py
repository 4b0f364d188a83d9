"""Byte-level BPE trained with Hugging Face `tokenizers`, saved so `transformers.AutoTokenizer` loads it.

Pre-tokenisation splits text GPT-4/Llama-3 style (letters, punctuation runs, whitespace) except that every
digit is its own piece, so numbers are always spelled digit by digit ("347" -> "3","4","7"): merges never
glue digits, and arithmetic sees place value consistently. The special tokens get ids 0..6 in the order
of `format.SPECIAL_TOKENS`; `<think>`, `</think>`, `<answer>`, `</answer>` are then re-marked as
non-special so `decode` keeps them. NFKC is the normaliser, so text encoded later is normalised like the
corpus was. The post-processor prepends `<|bos|>` (see `format.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from components.dataset.format import CONTROL_TOKENS, SPECIAL_TOKENS

from .config import TokenizerConfig

# GPT-4 (cl100k) split pattern with `\p{N}{1,3}` replaced by a single `\p{N}`
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)


def _base_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str], cfg: TokenizerConfig, *, length: int | None = None, progress: bool = False
):
    """Train the BPE on `texts`; returns a `tokenizers.Tokenizer` with specials at ids 0..6."""
    from tokenizers import Tokenizer, pre_tokenizers, processors, trainers

    tok = _base_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    # reasoning tags: single tokens that decode keeps (special=False); bos/eos/pad stay special
    spec = json.loads(tok.to_str())
    control = {SPECIAL_TOKENS[k] for k in CONTROL_TOKENS}
    for added in spec["added_tokens"]:
        added["special"] = added["content"] in control
        added["normalized"] = False
    return Tokenizer.from_str(json.dumps(spec))


def special_token_ids(tok) -> dict[str, int]:
    """{'bos': id, 'eos': id, ...} (names as in dataset.json)."""
    ids = {name: tok.token_to_id(s) for name, s in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[k] for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}")
    return ids


def save_tokenizer(tok, out_dir: Path, *, model_max_length: int) -> None:
    """Write `tokenizer.json` and a `tokenizer_config.json` for `transformers.PreTrainedTokenizerFast`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    added = {}
    for name, s in SPECIAL_TOKENS.items():
        added[str(tok.token_to_id(s))] = {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": name in CONTROL_TOKENS,
        }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS["bos"],
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["pad"],
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
