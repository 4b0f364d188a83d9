"""Generation with the latent cache: equal to full recomputation, stopping rules, sampling, reproducibility."""

from __future__ import annotations

import pytest
import torch

from components.model import LatentCache, Transformer, generate, model_info
from components.model.generate import draw

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [20, 21, 22, 23, 24]]  # ragged: left padding matters


@pytest.fixture(params=["qlora", "qfull"])
def model(request, kit):
    torch.manual_seed(0)
    q = dict(qlora={}, qfull={"q_lora_rank": None})[request.param]
    # A larger init spreads the logits so greedy choices are not near-ties.
    m = Transformer(kit.cfg(initializer_range=0.3, eos_token_id=None, **q)).eval()
    kit.randomize_biases(m, std=0.1)
    return m


def _recompute_greedy(model, prompt, n):
    seq, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logp = model(torch.tensor([seq]))[0, -1].log_softmax(-1)
            tok = int(logp.argmax())
            logprobs.append(float(logp[tok]))
            seq.append(tok)
    return seq[len(prompt):], logprobs


def test_greedy_with_cache_equals_full_recompute(model):
    results = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    for prompt, res in zip(PROMPTS, results, strict=True):
        tokens, logprobs = _recompute_greedy(model, prompt, 10)
        assert res.tokens == tokens
        torch.testing.assert_close(torch.tensor(res.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0)
        assert res.finish_reason == "length" and len(res.tokens) == 10


def test_absorbed_decode_logits_equal_full_forward_logits(model):
    """Prefill a padded batch, then decode 3 tokens at once and 1 more through the absorbed path."""
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    pad = 4  # row 1 is left-padded by 4
    cache = LatentCache.allocate(cfg, 2, 16, dtype=torch.float32, device="cpu")
    cache.valid[0, :8] = True
    cache.valid[1, pad:8] = True
    with torch.no_grad():
        model.forward_cached(ids[:, :8], cache)
        cache.valid[:, 8:11] = True
        chunk = model.forward_cached(ids[:, 8:11], cache, last_only=False)
        cache.valid[:, 11] = True
        last = model.forward_cached(ids[:, 11:12], cache)
        full0 = model(ids[:1])[0]
        full1 = model(ids[1:, pad:])[0]
    torch.testing.assert_close(chunk[0], full0[8:11], atol=1e-4, rtol=0)
    torch.testing.assert_close(chunk[1], full1[8 - pad:11 - pad], atol=1e-4, rtol=0)
    torch.testing.assert_close(last[0], full0[11], atol=1e-4, rtol=0)
    torch.testing.assert_close(last[1], full1[11 - pad], atol=1e-4, rtol=0)


def test_cache_stores_only_the_latent(model):
    cfg = model.cfg
    cache = LatentCache.allocate(cfg, 1, 8, dtype=torch.bfloat16, device="cpu")
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    assert cache.nbytes_per_token() == per_token == model_info(cfg, dtype_bytes=2)["kv_cache_bytes_per_token"]


def test_same_seed_same_samples_other_seed_other_samples(model):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=40, num_samples=3)
    a = generate(model, PROMPTS, seed=7, **kw)
    b = generate(model, PROMPTS, seed=7, **kw)
    c = generate(model, PROMPTS, seed=8, **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.logprobs for r in a] == [r.logprobs for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    assert [(r.prompt_index, r.sample_index) for r in a] == [(p, s) for p in range(3) for s in range(3)]


def test_logprobs_are_at_the_sampling_temperature(model):
    res = generate(model, [PROMPTS[0]], max_new_tokens=3, temperature=0.7, seed=1)[0]
    seq = list(PROMPTS[0])
    for tok, lp in zip(res.tokens, res.logprobs, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1]
        assert lp == pytest.approx(float((logits / 0.7).log_softmax(-1)[tok]), abs=1e-4)
        seq.append(tok)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.9)], ids=["full", "filtered"])
def test_entropies_are_those_of_the_full_distribution_at_the_temperature(model, top_k, top_p):
    """with_entropy: per token, the entropy of softmax(logits / T) over the whole vocabulary (the policy's,
    as a trainer logs it), whatever top-k/top-p restrict the draw to; the samples do not change."""
    kw = {"max_new_tokens": 4, "temperature": 0.7, "top_k": top_k, "top_p": top_p, "seed": 3, "num_samples": 2}
    plain = generate(model, PROMPTS, **kw)
    results = generate(model, PROMPTS, **kw, with_entropy=True)
    assert [r.tokens for r in results] == [r.tokens for r in plain] and plain[0].entropies is None
    for res in results:
        seq = list(PROMPTS[res.prompt_index])
        assert len(res.entropies) == len(res.tokens)
        for tok, ent in zip(res.tokens, res.entropies, strict=True):
            with torch.no_grad():
                logp = (model(torch.tensor([seq]))[0, -1] / 0.7).log_softmax(-1)
            assert ent == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-4)
            seq.append(tok)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = [r.tokens for r in generate(model, PROMPTS, max_new_tokens=6, temperature=0)]
    assert [r.tokens for r in generate(model, PROMPTS, max_new_tokens=6, top_k=1, seed=0)] == greedy
    assert [r.tokens for r in generate(model, PROMPTS, max_new_tokens=6, top_p=1e-6, seed=0)] == greedy


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    """The inverse-CDF draw: frequencies within 5 standard errors of the probabilities over 200,000 draws,
    rows need not be normalised, zero-probability tokens (also at both ends) never come up, and the same
    generator state gives the same tokens."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.0, 2.0, 0.0, 0.0, 6.0]])
    n = 100_000
    rows = probs.repeat_interleave(n, 0)
    tok = draw(rows, torch.Generator().manual_seed(0))
    for r in range(2):
        p = probs[r] / probs[r].sum()
        freq = torch.bincount(tok[r * n:(r + 1) * n], minlength=6).double() / n
        assert (freq[p == 0] == 0).all()
        se = (p * (1 - p) / n).sqrt().double()
        assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all(), (r, freq, p)
    again = draw(rows, torch.Generator().manual_seed(0))
    assert torch.equal(tok, again)
    # a row whose mass sits on its last token; a one-hot row
    assert draw(torch.tensor([[0.0, 0.0, 1e-30], [0.0, 1.0, 0.0]]), None).tolist() == [2, 1]


def test_top_k_restricts_the_sampled_tokens(model):
    res = generate(model, [PROMPTS[1]], max_new_tokens=1, temperature=5.0, top_k=3, seed=0, num_samples=60)
    with torch.no_grad():
        allowed = set(model(torch.tensor([PROMPTS[1]]))[0, -1].topk(3).indices.tolist())
    sampled = {r.tokens[0] for r in res}
    assert sampled <= allowed and len(sampled) > 1


def test_stops_at_eos_and_stop_tokens(model):
    greedy = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    stop_tok = greedy[0].tokens[3]
    first = greedy[0].tokens.index(stop_tok)
    res = generate(model, PROMPTS, max_new_tokens=8, temperature=0, eos_token_id=stop_tok)
    assert res[0].tokens == greedy[0].tokens[: first + 1]
    assert res[0].finish_reason == "stop" and res[0].stop == stop_tok
    by_stop_id = generate(model, PROMPTS, max_new_tokens=8, temperature=0, stop_token_ids=[stop_tok])
    assert by_stop_id[0].tokens == res[0].tokens
    for other, ref in zip(res[1:], greedy[1:], strict=True):  # the others run on after row 0 left the batch
        n = ref.tokens.index(stop_tok) + 1 if stop_tok in ref.tokens else len(ref.tokens)
        assert other.tokens == ref.tokens[:n]


class CharTokenizer:
    """Token id i decodes to the letter chr(97 + i % 26)."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_end_the_sequence_where_the_string_completes(model):
    tok = CharTokenizer()
    greedy = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    text = tok.decode(greedy[0].tokens)
    stop = text[4:6]
    end = text.index(stop) + len(stop)
    res = generate(model, PROMPTS, max_new_tokens=10, temperature=0, stop_strings=[stop], tokenizer=tok)
    assert res[0].tokens == greedy[0].tokens[:end]
    assert res[0].finish_reason == "stop" and res[0].stop == stop and res[0].text.endswith(stop)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, PROMPTS, max_new_tokens=2, stop_strings=["x"])


def test_generation_restores_training_mode_and_rejects_bad_arguments(model):
    model.train()
    generate(model, PROMPTS, max_new_tokens=2, temperature=0)
    assert model.training
    assert model.expert_counts().sum() == 0  # sampling never counts toward load balancing
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, PROMPTS, max_new_tokens=model.cfg.max_position_embeddings)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, PROMPTS, max_new_tokens=2, top_p=0)


def test_training_after_sampling_works(kit):
    """RL samples with generate() (inference mode), then trains the same model: nothing generate cached
    may be an inference tensor."""
    torch.manual_seed(5)
    model = Transformer(kit.cfg(mtp_depth=1))
    generate(model, PROMPTS, max_new_tokens=3, temperature=1.0, seed=0)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 30))  # longer than anything generate saw
    model.compute_loss(ids, ids).loss.backward()
    generate(model, PROMPTS, max_new_tokens=40, temperature=1.0, seed=0)  # grows the rope table again
    model.compute_loss(ids, ids).loss.backward()
    assert model.embed_tokens.weight.grad is not None
