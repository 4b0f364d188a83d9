"""Compiled decoding (``generate(..., compile=True)``): ``CausalLM.decode_step`` on a static cache traces
into one graph (``fullgraph``) for the MoE and the dense families, and gives eager generation's tokens,
log-probabilities, stops and seeded samples.

Most tests trace with ``aot_eager`` (dynamo + AOTAutograd: what inductor compiles, without generating
code, so they stay fast); one runs inductor itself, the path ``bench/model.py`` times."""

from __future__ import annotations

import pytest
import torch

from components.model import DenseForCausalLM, LlamaConfig, Transformer, generate
from components.model.compile import BACKEND_ENV
from components.model.generate import STATIC_LEN_MULTIPLE

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [20, 21, 22, 23, 24]]  # ragged: left padding matters


def _moe(kit):
    torch.manual_seed(0)
    m = Transformer(kit.cfg(initializer_range=0.3, eos_token_id=None, mtp_depth=0)).eval()
    kit.randomize_biases(m, std=0.1)
    return m


def _dense():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                      initializer_range=0.3, bos_token_id=0, eos_token_id=None)
    return DenseForCausalLM(cfg).eval()


@pytest.fixture(params=["moe", "dense"])
def model(request, kit):
    return _moe(kit) if request.param == "moe" else _dense()


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _same(got, want, logprob_atol=1e-5):
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [(r.finish_reason, r.stop) for r in got] == [(r.finish_reason, r.stop) for r in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=logprob_atol, rtol=0)


def test_compiled_greedy_decoding_equals_eager_with_stops(model, aot_eager):
    """Sequences that stop early keep their rows in the compiled batch and must not change the others."""
    stop = list(range(0, model.cfg.vocab_size, 3))  # a third of the vocabulary: rows end at different steps
    kw = dict(max_new_tokens=12, temperature=0, stop_token_ids=stop, eos_token_id=())
    eager = generate(model, PROMPTS, **kw)
    assert {r.finish_reason for r in eager} == {"stop", "length"} or len({len(r.tokens) for r in eager}) > 1
    _same(generate(model, PROMPTS, compile=True, **kw), eager)


def test_compiled_sampling_draws_what_eager_draws(model, aot_eager):
    """Only live rows are sampled, so one seed gives the same draws once sequences have finished."""
    stop = list(range(1, model.cfg.vocab_size, 4))
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=3, num_samples=2, stop_token_ids=stop,
              eos_token_id=(), with_entropy=True)
    eager, compiled = generate(model, PROMPTS, **kw), generate(model, PROMPTS, compile=True, **kw)
    _same(compiled, eager)
    for g, w in zip(compiled, eager, strict=True):
        torch.testing.assert_close(torch.tensor(g.entropies), torch.tensor(w.entropies), atol=1e-5, rtol=0)


def test_decode_step_is_one_graph_on_a_static_cache(model):
    """Every shape of a step follows from the cache's allocation: one graph, no break, and the cache is
    rounded up so that lengths within a multiple share it."""
    cache = model.allocate_cache(2, STATIC_LEN_MULTIPLE, dtype=torch.float32, device="cpu")
    cache.valid[:, :4] = True
    with torch.inference_mode():
        model.forward_cached(torch.randint(1, 60, (2, 4)), cache)
        model._rope(0, cache.max_len, torch.device("cpu"))
        cache.pos = torch.tensor([4])
        cache.valid[:, 4] = True
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.decode_step)(torch.randint(1, 60, (2, 1)), cache)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def _traced_ops(fn, *args, grad: bool = False) -> set[str]:
    """The ``moeflow::`` ops left in the graph torch.compile traces from fn(*args) (with gradients on or off)."""
    seen: set[str] = set()

    def capture(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("moeflow."):
                seen.add(str(node.target).split(".")[1])
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(fn, backend=capture, fullgraph=True)(*args)
    torch._dynamo.reset()
    return seen


def test_traced_without_gradient_the_kernels_are_their_torch_references(kit):
    """What inductor can fuse: no custom op is left in a no-gradient graph on the torch backend, except the
    grouped expert MLP of a batch too large for gathered GEMVs; with a gradient the ops stay. (The Triton
    backend keeps its ops: tests/kernels/test_ops.py.)"""
    model = _moe(kit)
    moe = model.layers[1].mlp
    assert isinstance(moe.experts.w_gate, torch.nn.Parameter)
    few, many = torch.randn(1, 2, model.cfg.hidden_size), torch.randn(1, 64, model.cfg.hidden_size)  # 24 rows/expert
    assert _traced_ops(lambda x: moe(x)[0], few) == set()
    assert _traced_ops(lambda x: moe(x)[0], many) == {"grouped_swiglu_mlp"}
    block = model.layers[1]
    cos, sin = model._rope(0, 2, few.device)
    assert _traced_ops(lambda x: block(x, cos, sin)[0], few) == set()
    with_grad = _traced_ops(lambda x: block(x, cos, sin)[0], few, grad=True)
    assert {"rms_norm", "apply_rope", "moe_permute", "grouped_swiglu_mlp", "moe_combine"} <= with_grad


def test_inductor_compiled_decoding_equals_eager(kit, monkeypatch):
    """The real thing: inductor's generated code (fused references, gathered expert GEMVs) on the MoE model."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    torch._dynamo.reset()
    model = _moe(kit)
    kw = dict(max_new_tokens=8, temperature=0, eos_token_id=())
    try:
        _same(generate(model, PROMPTS, compile=True, **kw), generate(model, PROMPTS, **kw), logprob_atol=1e-4)
    finally:
        torch._dynamo.reset()
