"""The BPE tokenizer: special tokens are single ids, digits are split, transformers loads it."""

from __future__ import annotations

import pytest

from components.data import SPECIAL_TOKENS, TokenizerConfig
from components.data.english import generic_documents
from components.data.tokenizer import save_tokenizer, special_token_ids, train_tokenizer

DOC = (
    "Think in <think></think>, answer in <answer></answer>.\nQ: What is 1234 + 5678?\n"
    "A:<think>1234 + 5678 = 6912</think><answer>6912</answer>"
)


@pytest.fixture(scope="module")
def tok():
    corpus = generic_documents(300, 0) + [DOC.replace("1234", str(n)) for n in range(1000, 1300)]
    return train_tokenizer(corpus, TokenizerConfig(vocab_size=600, min_frequency=2))


def test_special_tokens_have_ids_0_to_6_and_encode_as_single_tokens(tok):
    ids = special_token_ids(tok)
    assert ids == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    for name, s in SPECIAL_TOKENS.items():
        assert tok.encode(f"x{s}y", add_special_tokens=False).ids[1:2] == [ids[name]], name


def test_merges_never_swallow_special_tokens(tok):
    specials = set(SPECIAL_TOKENS.values())
    pieces = ("<think", "think>", "<answer", "answer>", "<|", "|>")
    assert not [t for t in tok.get_vocab() if t not in specials and any(p in t for p in pieces)]


def test_every_digit_is_its_own_token(tok):
    enc = tok.encode("x = 1234567890 and 42", add_special_tokens=False)
    digits = [t for t in enc.tokens if any(c.isdigit() for c in t)]
    assert digits == list("1234567890") + ["4", "2"]
    assert all(not any(c.isdigit() for c in t) or len(t) == 1 for t in tok.get_vocab())


def test_encode_prepends_bos_and_decode_keeps_reasoning_tags(tok):
    ids = tok.encode(DOC).ids
    assert ids[0] == special_token_ids(tok)["bos"]
    assert tok.decode(ids) == DOC  # bos is special and skipped; <think>/<answer> stay
    assert tok.decode(tok.encode(DOC, add_special_tokens=False).ids) == DOC


def test_transformers_loads_the_saved_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    save_tokenizer(tok, tmp_path, model_max_length=64)
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        hf = cls.from_pretrained(str(tmp_path))
        assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
        assert hf(DOC)["input_ids"] == tok.encode(DOC).ids
        assert hf.decode(hf(DOC)["input_ids"], skip_special_tokens=True) == DOC
