"""Fixtures of the RL tests: a very small pretrained base on easy arithmetic, and its dataset directory.

`tiny_base` pretrains (one thread, ~30-60 s) a 2-layer MoE on 90 two-operand arithmetic problems (operands
1..6) whose worked solutions end in a wrong answer 30% of the time (as the real corpus does), so the
base is right only part of the time and GRPO has headroom. The result is cached in pytest's cache
directory under a key that covers the recipe, torch's version and the source of every module the
training touches, and the CPU code path (`cpu_path`); single-threaded float32 training on one code path
is deterministic, so a cached base is bit for bit the one a fresh run would train. Another code path
trains another base (the last bits differ, and grow over 300 steps), so a cache filled under one path is
not reused under another (e.g. by ATEN_CPU_CAPABILITY=default, or on a copied cache directory).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.cpupath import cpu_path

REPO = Path(__file__).resolve().parents[2]

RECIPE = {
    "family": {"min_operands": 2, "max_operands": 2, "max_value": 6},
    "n_problems": 90, "n_eval": 30, "wrong_fraction": 0.3, "vocab_size": 300,
    "model": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                  max_position_embeddings=128, routed_scaling_factor=1.0),
    "steps": 300, "batch_size": 32, "seq_len": 64, "lr": 5e-3, "warmup": 20, "seed": 0,
}
SOURCES = ["components/model", "kernels", "components/data/tokenizer.py", "components/tasks/families.py",
           "components/tasks/problem.py", "components/refs/checkpoint.py"]


def easy_family():
    from components.tasks import get_family

    return get_family("arithmetic", **RECIPE["family"])


def _recipe_key() -> str:
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    h.update(torch.__version__.encode())
    h.update(json.dumps(cpu_path(), sort_keys=True).encode())
    for src in SOURCES:
        p = REPO / src
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(str(f.relative_to(REPO)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _write_dataset_dir(out: Path, tok, eval_problems) -> None:
    """The parts of a prepared dataset directory RL reads: dataset.json, the tokenizer, eval/<family>.jsonl."""
    from components.data.tokenizer import save_tokenizer, special_token_ids
    from components.dataset.format import FORMAT_NAME, FORMAT_VERSION, SPECIAL_TOKENS

    out.mkdir(parents=True)
    save_tokenizer(tok, out, model_max_length=RECIPE["seq_len"])
    (out / "eval").mkdir()
    with open(out / "eval" / "arithmetic.jsonl", "w") as f:
        for p in eval_problems:
            f.write(json.dumps(p.to_dict(), sort_keys=True) + "\n")
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "dtype": "uint16",
            "seq_len": RECIPE["seq_len"], "row_len": RECIPE["seq_len"] + 1, "vocab_size": tok.get_vocab_size(),
            "special_tokens": special_token_ids(tok), "special_token_strings": dict(SPECIAL_TOKENS),
            "tokenizer_adds_bos": True, "splits": {},
            "eval": {"arithmetic": {"file": "eval/arithmetic.jsonl", "problems": len(eval_problems)}}}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))


def _pretrain(out: Path) -> None:
    from components.data.config import TokenizerConfig
    from components.data.tokenizer import train_tokenizer
    from components.model import ModelConfig, Transformer
    from components.refs.checkpoint import save_model
    from components.tasks import make_split

    r = RECIPE
    problems = make_split(easy_family(), r["n_problems"], r["seed"])
    train, held_out = problems[r["n_eval"]:], problems[: r["n_eval"]]
    # the held-out problems are seen in pretraining too: this base is for testing the machinery, not
    # for measuring generalisation (the tiny preset's dataset has a real held-out split)
    tok = train_tokenizer([p.prompt + p.completion() for p in problems],
                          TokenizerConfig(vocab_size=r["vocab_size"]))
    _write_dataset_dir(out / "dataset", tok, held_out)
    torch.manual_seed(r["seed"])
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=1, pad_token_id=2, **r["model"])
    model = Transformer(cfg)
    good = [tok.encode(p.prompt + p.completion()).ids + [1] for p in problems]
    bad = [tok.encode(p.prompt + p.completion(correct=False)).ids + [1] for p in problems]
    rng = random.Random(r["seed"])
    B, S = r["batch_size"], r["seq_len"]
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(r["steps"]):
        scale = min(1.0, (step + 1) / r["warmup"]) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / r["steps"])))
        for group in opt.param_groups:
            group["lr"] = r["lr"] * scale
        stream: list[int] = []
        while len(stream) < B * (S + 1):
            i = rng.randrange(len(problems))
            stream += bad[i] if rng.random() < r["wrong_fraction"] else good[i]
        rows = torch.tensor(stream[: B * (S + 1)]).view(B, S + 1)
        loss = model.compute_loss(rows[:, :-1], rows[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_expert_bias()
    save_model(model, cfg, out / "model", out / "dataset", extra={"recipe": RECIPE})
    (out / "train_ids.json").write_text(json.dumps([p.id for p in train]))


@dataclass
class TinyBase:
    model_dir: Path
    dataset_dir: Path

    def load(self):
        from components.refs.checkpoint import load_model

        return load_model(self.model_dir)[0]

    def tokenizer(self):
        from components.dataset.format import load_tokenizer

        return load_tokenizer(self.model_dir)

    def problems(self):
        """The 90 problems of the recipe (those the base was pretrained on)."""
        from components.tasks import make_split

        return make_split(easy_family(), RECIPE["n_problems"], RECIPE["seed"])


@pytest.fixture(scope="session")
def tiny_base(request, tmp_path_factory) -> TinyBase:
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    base = Path(cache.mkdir("rl-tiny-base")) if cache is not None else tmp_path_factory.mktemp("rl-tiny-base")
    root = base / _recipe_key()
    if not (root / "model" / "model.safetensors").is_file():
        tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")  # one per process: test workers may race
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _pretrain(tmp)
        finally:
            torch.set_num_threads(saved)
        if (root / "model" / "model.safetensors").is_file():  # another process finished first: same bits
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
    return TinyBase(root / "model", root / "dataset")
