"""torch.compile: a decoder block (dense and MoE) and the whole model trace into one graph each (zero graph
breaks; every kernel is a ``moeflow::`` custom op) and give the eager outputs, gradients and expert counts.

``aot_eager`` traces exactly what inductor would compile (dynamo + AOTAutograd, forward and backward
graphs) without generating code, so these tests stay fast; one small test runs inductor itself."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from components.model import Transformer
from components.model.compile import compile_model, is_compiled, isolate_inductor_cache


def _model(kit, **overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(kit.cfg(**overrides)).train()
    kit.randomize_biases(model, std=0.05)
    return model


def _step(fn, params: dict[str, torch.nn.Parameter], x: torch.Tensor, *args):
    """Forward + backward of ``fn(x, *args)`` (a block: (y, aux)); -> (y, dx, {name: grad})."""
    for p in params.values():
        p.grad = None
    x = x.clone().requires_grad_()
    y, _ = fn(x, *args)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in params.items()}


def _assert_same(got, want, atol=1e-6):
    (y, dx, grads), (y0, dx0, grads0) = got, want
    torch.testing.assert_close(y, y0, atol=atol, rtol=atol)
    torch.testing.assert_close(dx, dx0, atol=atol, rtol=atol)
    assert grads.keys() == grads0.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads0[name], atol=atol, rtol=atol, msg=name)


@pytest.mark.parametrize("layer", [0, 1], ids=["dense", "moe"])
def test_decoder_block_compiles_to_one_graph_and_matches_eager(kit, layer):
    model = _model(kit, num_hidden_layers=2, mtp_depth=0)
    block = model.layers[layer]
    x = torch.randn(2, 12, model.cfg.hidden_size)
    cos, sin = model._rope(0, 12, x.device)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, cos, sin)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    params = dict(block.named_parameters())
    eager = _step(block, params, x, cos, sin)
    compiled = _step(torch.compile(block, backend="aot_eager", fullgraph=True), params, x, cos, sin)
    _assert_same(compiled, eager)


def test_whole_model_compiles_fullgraph_and_matches_eager(kit):
    """compute_loss (trunk, MoE layers, MTP, fused cross-entropy, aux loss) and hidden_states, fullgraph."""
    model = _model(kit, mtp_depth=1, seq_aux_loss_weight=0.01)
    twin = compile_model(copy.deepcopy(model), backend="aot_eager")
    assert is_compiled(twin) and not is_compiled(model)
    assert twin.compute_loss.__self__ is twin and copy.deepcopy(twin).compute_loss.__self__ is not twin
    torch.manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17))
    labels = torch.randint(0, model.cfg.vocab_size, (2, 17))
    labels[0, :4] = -100
    outs = []
    for m in (model, twin):
        out = m.compute_loss(ids, labels)  # fullgraph=True: any graph break would raise here
        out.loss.backward()
        outs.append((out, {n: p.grad for n, p in m.named_parameters()}, m.expert_counts().clone()))
    (o, g, c), (o2, g2, c2) = outs
    for part in ("loss", "lm_loss", "mtp_loss", "aux_loss", "n_tokens"):
        torch.testing.assert_close(getattr(o2, part), getattr(o, part), atol=1e-6, rtol=1e-6, msg=part)
    for name in g:
        torch.testing.assert_close(g2[name], g[name], atol=1e-6, rtol=1e-6, msg=name)
    assert torch.equal(c, c2), "expert counts (aux-free balancing) must accumulate the same when compiled"
    with torch.no_grad():
        torch.testing.assert_close(twin.hidden_states(ids), model.hidden_states(ids), atol=1e-6, rtol=1e-6)
    assert list(twin.state_dict()) == list(model.state_dict()), "compiling must not rename parameters"


def test_moe_layer_compiles_with_inductor(kit):
    """Inductor itself (C++ code generation on CPU) on the MoE layer, forward and backward."""
    model = _model(kit, num_hidden_layers=1, first_k_dense_replace=0, mtp_depth=0, n_shared_experts=1)
    moe = model.layers[0].mlp
    x = torch.randn(2, 9, model.cfg.hidden_size)
    params = dict(moe.named_parameters())

    def layer(x):
        return moe(x)

    eager = _step(layer, params, x)
    isolate_inductor_cache()  # as compile_model does: run under each ATEN_CPU_CAPABILITY, this test failed
    compiled = _step(torch.compile(layer, backend="inductor", fullgraph=True), params, x)
    _assert_same(compiled, eager, atol=1e-5)


def test_each_forced_cpu_capability_gets_its_own_inductor_cache(monkeypatch, tmp_path):
    """Inductor's FX graph cache does not key on ATEN_CPU_CAPABILITY (an AVX2 graph reloaded under
    ``default`` fails to build): a forced capability gets its own directory, a user's choice is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert isolate_inductor_cache() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert isolate_inductor_cache() == os.environ["TORCHINDUCTOR_CACHE_DIR"] == f"{default}-isa-default"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)  # torch filled in its default: still isolated
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert isolate_inductor_cache() == f"{default}-isa-avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the user's own directory: left alone
    assert isolate_inductor_cache() is None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
