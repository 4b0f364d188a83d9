"""SFT: packing and loss masks, learning, resume, logit distillation."""

from __future__ import annotations

import re

import pytest
import torch

import kernels
from components.common.config import OptimConfig
from components.model.compile import compile_model
from components.sft.sft import (
    IGNORE_INDEX,
    DistillLossConfig,
    Sequenced,
    SFTConfig,
    completion_loss,
    offpolicy_loss,
    pack_sequences,
    sft_train,
    tokenize_examples,
)


def test_tokenized_example_trains_on_completion_and_eos_only(tok, examples):
    seq = tokenize_examples(tok, examples[:1], bos_id=0, eos_id=1)[0]
    prompt_len = 1 + len(tok.encode(examples[0]["prompt"], add_special_tokens=False).ids)
    assert seq.tokens[0] == 0 and seq.tokens[-1] == 1
    assert seq.train_mask == [False] * prompt_len + [True] * (len(seq.tokens) - prompt_len)
    assert tok.decode(seq.tokens[prompt_len:-1]) == examples[0]["completion"]


def test_packing_puts_several_whole_examples_in_a_row_and_masks_prompt_and_padding():
    seqs = [Sequenced([5, 6, 7, 8], [False, False, True, True]), Sequenced([9, 10, 11], [False, True, True]),
            Sequenced([12, 13, 14, 15, 16, 17], [False] * 3 + [True] * 3)]
    rows = pack_sequences(seqs, 7, pad_id=2)  # rows of 8 tokens: [0,1] fit together, [2] alone
    assert rows.inputs.shape == (2, 7)
    assert rows.inputs[0].tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert rows.labels[0].tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, 11, IGNORE_INDEX]
    assert rows.inputs[1].tolist() == [12, 13, 14, 15, 16, 17, 2]
    assert rows.labels[1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 15, 16, 17, IGNORE_INDEX, IGNORE_INDEX]
    assert rows.trained_tokens == 2 + 2 + 3 and rows.truncated == 0


def test_packing_truncates_a_sequence_longer_than_a_row():
    rows = pack_sequences([Sequenced(list(range(3, 13)), [False] + [True] * 9)], 5, pad_id=2)
    assert rows.truncated == 1
    assert rows.inputs.tolist() == [[3, 4, 5, 6, 7]] and rows.labels.tolist() == [[4, 5, 6, 7, 8]]


def test_sft_lowers_completion_loss(tok, examples, make_model):
    model = make_model()
    before = completion_loss(model, tok, examples[:32])["loss"]
    cfg = SFTConfig(seq_len=128, batch_size=8, max_steps=30, log_every=10, optim=OptimConfig(lr=3e-3))
    lines: list[str] = []
    metrics = sft_train(model, tok, examples, cfg, log=lines.append)
    after = completion_loss(model, tok, examples[:32])["loss"]
    assert after < before - 1.0, (before, after)
    assert metrics["steps"] == 30 and metrics["packing_fill"] > 0.7
    assert metrics["trained_tokens"] > 0
    assert len(lines) == 3 and all(re.search(r", eta \d+m\d\ds$", line) for line in lines), lines
    assert lines[-1].endswith("eta 0m00s")


def test_resumed_training_equals_uninterrupted(tok, examples, make_model):
    cfg = SFTConfig(seq_len=96, batch_size=4, max_steps=6, ckpt_every=3)
    straight = make_model()
    sft_train(straight, tok, examples[:40], cfg)

    saved = {}
    first = make_model()

    def keep(step, state):
        if step == 3:
            saved.update(state)
            raise KeyboardInterrupt  # the job dies right after its step-3 checkpoint

    with pytest.raises(KeyboardInterrupt):
        sft_train(first, tok, examples[:40], cfg, checkpoint=keep)
    resumed = make_model(seed=123)  # a fresh process: different init, overwritten by the checkpoint
    sft_train(resumed, tok, examples[:40], cfg, resume=saved)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_distill_loss_matches_full_logit_reference(tok, examples, make_model, kind, beta):
    student, teacher = make_model(seed=1), make_model(seed=2, hidden_size=48)
    rows = pack_sequences(tokenize_examples(tok, examples[:6], bos_id=0, eos_id=1), 96, pad_id=2)
    dcfg = DistillLossConfig(kind=kind, beta=beta, temperature=2.0, kd_weight=0.25, chunk_size=16)
    loss, parts = offpolicy_loss(student, rows.inputs, rows.labels, teacher=teacher, dcfg=dcfg)
    mask = (rows.labels != IGNORE_INDEX).reshape(-1)
    V = student.output_weight().shape[0]
    zs, zt = student(rows.inputs).reshape(-1, V)[mask], teacher(rows.inputs).reshape(-1, V)[mask].detach()
    ls, lt = (zs / 2.0).log_softmax(-1), (zt / 2.0).log_softmax(-1)
    if kind == "forward_kl":
        kd = (lt.exp() * (lt - ls)).sum(-1).mean()
    elif kind == "reverse_kl":
        kd = (ls.exp() * (ls - lt)).sum(-1).mean()
    else:
        lm = torch.logsumexp(torch.stack([ls + torch.log(torch.tensor(1 - beta)),
                                          lt + torch.log(torch.tensor(beta))]), 0)
        kd = beta * (lt.exp() * (lt - lm)).sum(-1).mean() + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(student(rows.inputs).reshape(-1, V), rows.labels.reshape(-1),
                                           ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, 0.75 * ce + 0.25 * kd, rtol=1e-4, atol=1e-5)
    assert parts["kd"] == pytest.approx(float(kd.detach()), rel=1e-4)


def test_distillation_moves_student_towards_teacher(tok, examples, make_model):
    teacher = make_model(seed=5)
    sft_train(teacher, tok, examples, SFTConfig(seq_len=128, batch_size=8, max_steps=20))
    rows = pack_sequences(tokenize_examples(tok, examples[:8], bos_id=0, eos_id=1), 128, pad_id=2)
    dcfg = DistillLossConfig(kd_weight=1.0)

    def kd(student):
        with torch.no_grad():
            return float(offpolicy_loss(student, rows.inputs, rows.labels, teacher=teacher, dcfg=dcfg)[1]["kd"])

    student = make_model(seed=6)
    before = kd(student)
    metrics = sft_train(student, tok, examples, SFTConfig(seq_len=128, batch_size=8, max_steps=15),
                        teacher=teacher, distill_cfg=DistillLossConfig(kd_weight=1.0, on_policy_fraction=0.5,
                                                                       on_policy_prompts=4,
                                                                       on_policy_max_new_tokens=16))
    assert kd(student) < 0.7 * before
    assert "kd_on_policy" in metrics and "kd" in metrics  # both kinds of step ran
    assert all(not p.requires_grad for p in teacher.parameters())


def test_distillation_rejects_a_teacher_with_another_vocabulary(tok, examples, make_model):
    teacher = make_model(vocab_size=tok.get_vocab_size() + 5)
    with pytest.raises(ValueError, match="vocabularies differ"):
        sft_train(make_model(), tok, examples, SFTConfig(max_steps=1), teacher=teacher,
                  distill_cfg=DistillLossConfig())


def test_fused_kernel_is_what_distillation_calls(monkeypatch, tok, examples, make_model):
    calls = []
    real = kernels.fused_linear_distill_loss
    monkeypatch.setattr(kernels, "fused_linear_distill_loss", lambda *a, **k: calls.append(k) or real(*a, **k))
    rows = pack_sequences(tokenize_examples(tok, examples[:2], bos_id=0, eos_id=1), 64, pad_id=2)
    offpolicy_loss(make_model(), rows.inputs, rows.labels, teacher=make_model(seed=3),
                   dcfg=DistillLossConfig(chunk_size=8))
    assert calls and calls[0]["chunk_size"] == 8


def test_mixed_rows_follow_every_batch_and_train_on_all_their_tokens():
    from components.sft.sft import batches

    seqs = [Sequenced([5, 6, 7, 8], [False, True, True, True])] * 6
    corpus = torch.arange(100, 100 + 5 * 9).reshape(5, 9)
    cfg = SFTConfig(seq_len=8, batch_size=1, mix_rows_per_batch=2)
    stream = batches(seqs, cfg, pad_id=2, mix_rows=corpus)
    seen = []
    for _ in range(5):  # 5 batches x 2 rows = every corpus row twice
        inputs, labels = next(stream)
        assert inputs.shape == (3, 8) and labels.shape == (3, 8)
        assert (labels[1:] == inputs[1:] + 1).all()  # consecutive tokens: targets are the next ones
        seen += [int(r[0]) for r in inputs[1:]]
    assert sorted(seen) == sorted([100 + 9 * i for i in range(5)] * 2)
    with pytest.raises(ValueError, match="mix_rows"):
        next(batches(seqs, cfg, pad_id=2, mix_rows=None))


def test_compiled_student_distils_like_the_eager_one(tok, examples, make_model):
    """`compile: true` (distillation stage): the student's hidden_states compiled (aot_eager: the graphs
    inductor would get); logit-distillation steps give the eager losses."""
    teacher = make_model(seed=5)
    cfg = SFTConfig(seq_len=64, batch_size=4, max_steps=2)
    metrics = []
    for compiled in (False, True):
        student = make_model(seed=6)
        if compiled:
            compile_model(student, backend="aot_eager")
        metrics.append(sft_train(student, tok, examples[:16], cfg, teacher=teacher,
                                 distill_cfg=DistillLossConfig(kd_weight=1.0)))
    eager, compiled = metrics
    for key in ("loss", "kd"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), key
