"""``torch.compile`` of the model's training forward passes (the trainers' ``compile: true``).

``compile_model(model)`` replaces, on this instance only, ``compute_loss`` (pretraining, SFT) and
``hidden_states`` (RL, distillation) by compiled versions: one graph each (``fullgraph``: every kernel is a
``torch.library`` custom op, so nothing breaks the graph). Generation's prefill (``forward_cached``:
data-dependent lengths) stays eager; its decoding steps compile with ``generate(..., compile=True)``
(``compiled_decode_step``: a static cache, one graph per batch size and rounded length). The compiled
methods are bound to the instance with ``types.MethodType``, so ``copy.deepcopy(model)`` binds them to the
copy; parameter names and the state dict are untouched (checkpoints do not change).

The backend is ``inductor`` unless ``MOEFLOW_COMPILE_BACKEND`` names another (``aot_eager`` traces the
same graphs without generating code: what the tests use, being fast).

Inductor's on-disk cache (FX graph cache) is keyed without ``ATEN_CPU_CAPABILITY``: a graph compiled with
the default ISA (AVX2 code, ``at::vec``) and reloaded under ``ATEN_CPU_CAPABILITY=default`` is rebuilt
without the ISA's defines and fails with ``CppCompileError: 'at::vec' has not been declared`` (torch
2.13, measured here). ``isolate_inductor_cache`` gives each forced capability a cache directory of its own.
"""

from __future__ import annotations

import os
import types

import torch

BACKEND_ENV = "MOEFLOW_COMPILE_BACKEND"
COMPILED_METHODS = ("compute_loss", "hidden_states")


def compile_backend() -> str:
    return os.environ.get(BACKEND_ENV, "").strip() or "inductor"


def isolate_inductor_cache() -> str | None:
    """With ``ATEN_CPU_CAPABILITY`` set and no cache directory chosen by the user (unset, or torch's default
    already filled in), point ``TORCHINDUCTOR_CACHE_DIR`` at ``<default>-isa-<capability>``; -> the path set."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip()
    if not capability:
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is not None and os.path.abspath(current) != default:
        return None
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path = f"{default}-isa-{capability}"
    return path


def compile_model(model: torch.nn.Module, backend: str | None = None, fullgraph: bool = True) -> torch.nn.Module:
    """Compile ``model``'s training forwards in place (see the module doc); returns the model."""
    backend = backend or compile_backend()
    isolate_inductor_cache()
    for name in COMPILED_METHODS:
        fn = torch.compile(getattr(type(model), name), backend=backend, fullgraph=fullgraph)
        setattr(model, name, types.MethodType(fn, model))
    return model


_decode_steps: dict[tuple[str, object], object] = {}


def compiled_decode_step(model: torch.nn.Module):
    """``torch.compile`` of ``CausalLM.decode_step`` (static shapes, one graph: ``fullgraph``), called as
    ``step(model, input_ids_B1, cache)``; what ``generate(..., compile=True)`` runs after the prefill.

    One compiled function per backend, shared by every model: torch.compile keeps a graph per model, batch
    size and cache length, each compiled at its first call (``torch._dynamo.config.recompile_limit``
    graphs at most; past it, steps run eager). On the torch kernel backend with no gradient, the kernels
    trace their references (``kernels._direct``), so inductor fuses the norms, RoPE, SwiGLU and routing
    with their neighbours and runs small-batch routed experts as gathered GEMVs
    (``kernels.reference.moe.ffn_gathered``).
    """
    key = (compile_backend(), type(model).decode_step)
    fn = _decode_steps.get(key)
    if fn is None:
        isolate_inductor_cache()
        fn = _decode_steps[key] = torch.compile(key[1], backend=key[0], dynamic=False, fullgraph=True)
    return fn


def is_compiled(model: torch.nn.Module) -> bool:
    return all(name in vars(model) for name in COMPILED_METHODS)
