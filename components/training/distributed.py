"""Data parallelism applied from outside the single-device model: process group, DDP / FSDP2, collectives.

torchrun (started by the launcher from the stage's `resources`) sets RANK / WORLD_SIZE / LOCAL_RANK and
the rendezvous; `init` joins the process group with gloo on CPU or NCCL on GPU (or what the config
names). The model's loss is computed through `LossModule.forward`, so that DDP's and FSDP2's forward
hooks run (they are registered on `forward`, and the model trains through `compute_loss`).

- DDP: gradients all-reduced (averaged) in backward; `broadcast_buffers=False`, because each rank's
  expert counters are its own until the trainer all-reduces them.
- FSDP2: `fully_shard` on every transformer block, then on the root (embedding, final norm, head, MTP
  modules); parameters become DTensors sharded on dim 0, gradients are reduce-scattered (averaged).
With one process neither is applied and every collective here is a no-op.

Expert parallelism (`ep` > 1, composed as torchtitan does): the world is a (dp, ep) grid, rank =
dp_index * ep + ep_index. The `ep` ranks of a row share the routed experts (E/ep each, `Experts.shard`)
and exchange tokens with all-to-alls; the `dp` ranks of a column hold the same expert shard. Every rank
still reads its own micro-batches (data parallel over the whole world). Gradients:
- non-expert parameters: averaged over the whole world (DDP, or FSDP2 sharded over the world);
- expert parameters: each shard's gradient already sums the contributions of its EP row's tokens (the
  all-to-all's backward brings them home), so it is summed over the column's `dp` replicas and divided
  by the world size -- the same average over all tokens one process would take. Under DDP the trainer
  calls `sync_expert_grads` (DDP is told to ignore the expert parameters); under FSDP2 each `Experts`
  module is `fully_shard`-ed over its column (its reduce-scatter averages over the `dp` replicas) and
  `sync_expert_grads` divides by `ep` (FSDP2's own divide factor would need PREMUL_SUM, which gloo lacks).
The global gradient norm and the full state dict (checkpoints) gather the expert shards
(`clip_grad_norm`, `gather_expert_state`); `shard_expert_state` slices a full state for this rank, so a
checkpoint resumes at any EP size that divides the experts.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from components.model.moe import ExpertParallel, Experts

log = logging.getLogger(__name__)
_OWN_GROUP = False  # whether `init` created the process group (and `destroy` may tear it down)


@dataclass
class DistEnv:
    """Where this process sits: rank, world size, local rank, device and process-group backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(kind: str, local_rank: int) -> torch.device:
    """`auto`: this rank's GPU when CUDA is available, else the CPU; `cuda` without a GPU is an error."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA GPU is available; set device: cpu or auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init(device_kind: str, backend: str, rank: int, world_size: int, local_rank: int,
         timeout_s: float = 1800) -> DistEnv:
    """Choose the device and, with several processes, join the process group (idempotent)."""
    device = pick_device(device_kind, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistEnv(rank, 1, local_rank, device, None)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("parallel.backend nccl needs GPUs; use gloo (or auto) on CPU")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world_size} but no MASTER_ADDR: start several processes with torchrun")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        global _OWN_GROUP
        _OWN_GROUP = True
    log.info("process group: rank %d/%d (local %d), backend %s, device %s", rank, world_size, local_rank,
             backend, device)
    return DistEnv(rank, world_size, local_rank, device, backend)


def destroy() -> None:
    """Leave the process group `init` joined (one the caller had joined before stays)."""
    global _OWN_GROUP
    if dist.is_initialized() and _OWN_GROUP:
        dist.destroy_process_group()
    _OWN_GROUP = False


class LossModule(nn.Module):
    """`forward(input_ids, labels) -> (loss, lm_loss, mtp_loss, aux_loss)` of the wrapped model, so that
    parallel wrappers see a forward call. Missing parts are zero tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.compute_loss(input_ids, labels)
        zero = out.lm_loss.detach().new_zeros(())
        mtp = out.mtp_loss if out.mtp_loss is not None else zero
        aux = out.aux_loss if out.aux_loss is not None else zero
        return out.loss, out.lm_loss, mtp, aux


@dataclass
class EPMesh:
    """The (dp, ep) grid of an expert-parallel run: `ep_group` (this rank's row: the ranks sharing the
    experts), `dp_group` / `dp_mesh` (its column: the replicas of this rank's expert shard)."""

    ep: int
    dp: int
    ep_rank: int
    ep_group: Any
    dp_group: Any
    dp_mesh: Any
    world_mesh: Any


def expert_modules(model: nn.Module) -> list[tuple[str, Experts]]:
    """(qualified name, module) of every routed-experts stack, trunk and MTP alike."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Experts)]


def expert_param_names(model: nn.Module) -> list[str]:
    return [f"{name}.{p}" for name, _ in expert_modules(model) for p in ("w_gate", "w_up", "w_down")]


def apply_expert_parallel(model: nn.Module, env: DistEnv, ep: int) -> EPMesh | None:
    """Shard the routed experts of `model` over rows of `ep` ranks; None when ep == 1 (nothing changes)."""
    if ep == 1:
        return None
    if env.world_size % ep:
        raise ValueError(f"parallel.ep ({ep}) must divide the number of processes ({env.world_size})")
    from torch.distributed.device_mesh import init_device_mesh

    dp = env.world_size // ep
    mesh = init_device_mesh(env.device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("world",))
    info = EPMesh(ep=ep, dp=dp, ep_rank=env.rank % ep, ep_group=mesh["ep"].get_group(),
                  dp_group=mesh["dp"].get_group(), dp_mesh=mesh["dp"], world_mesh=world_mesh)
    for _, experts in expert_modules(model):
        experts.shard(ExpertParallel(group=info.ep_group, rank=info.ep_rank, size=ep))
    n = model.cfg.n_routed_experts // ep
    log.info("expert parallel: ep %d x dp %d; rank %d holds experts %d-%d of each MoE layer", ep, dp, env.rank,
             info.ep_rank * n, (info.ep_rank + 1) * n - 1)
    return info


def parallelize(model: nn.Module, env: DistEnv, strategy: str, *, reshard_after_forward: bool = True,
                ep: EPMesh | None = None) -> nn.Module:
    """The module to train through: `LossModule(model)`, wrapped in DDP or sharded with FSDP2 (the
    experts of an expert-parallel model apart, see the module docstring)."""
    module = LossModule(model)
    if not env.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        if ep is not None:  # expert gradients are synchronised over their replicas by `sync_expert_grads`
            DDP._set_params_and_buffers_to_ignore_for_model(
                module, [f"model.{n}" for n in expert_param_names(model)])
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(module, device_ids=ids, broadcast_buffers=False)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        kw: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
        if ep is not None:
            for _, experts in expert_modules(model):  # their own group, sharded over the shard's replicas
                fully_shard(experts, mesh=ep.dp_mesh, **kw)
            kw["mesh"] = ep.world_mesh
        # MTP modules run through `forward_mtp` and their head norm is applied outside it, so they stay
        # in the root's group (gathered for the whole forward) instead of getting hooks of their own.
        for block in model.layers:
            fully_shard(block, **kw)
        fully_shard(module, **kw)
        return module
    raise ValueError(f"unknown parallel.strategy {strategy!r}; use ddp or fsdp")


def _expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [getattr(m, p) for _, m in expert_modules(model) for p in ("w_gate", "w_up", "w_down")]


@torch.no_grad()
def sync_expert_grads(model: nn.Module, ep: EPMesh | None, world_size: int, strategy: str = "ddp") -> None:
    """After the last backward of a step: the expert gradients become the average over all tokens of the
    global batch. DDP: sum each shard's gradient over its replicas, divide by the world size; FSDP2
    (already averaged over the replicas): divide by ep."""
    if ep is None:
        return
    params = _expert_params(model)
    for p in params:
        if p.grad is None:  # no token reached this shard: its gradient is zero, not absent
            p.grad = torch.zeros_like(p)
    if strategy == "fsdp":
        for p in params:
            g_local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            g_local.div_(ep.ep)
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if ep.dp > 1:
        dist.all_reduce(flat, group=ep.dp_group)
    flat /= world_size
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p))


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, ep: EPMesh, strategy: str) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over an expert-parallel model: the norm of the whole gradient
    (every expert shard counted once), then every gradient scaled by min(1, max_norm / (norm + 1e-6))."""
    experts = {id(p) for p in _expert_params(model)}
    grads = [(p.grad, id(p) in experts) for p in model.parameters() if p.grad is not None]

    def local(g: torch.Tensor) -> torch.Tensor:
        return g.to_local() if hasattr(g, "to_local") else g

    sq = torch.zeros(2, dtype=torch.float64, device=grads[0][0].device if grads else None)
    for g, is_expert in grads:
        sq[int(is_expert)] += local(g).double().pow(2).sum()
    if strategy == "fsdp":  # every gradient is a shard: sum the squares over the world
        dist.all_reduce(sq)
    else:  # replicated non-expert gradients; expert shards differ along the EP row
        part = sq[1:].clone()
        dist.all_reduce(part, group=ep.ep_group)
        sq[1] = part[0]
    total = sq.sum().sqrt().to(torch.float32)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g, _ in grads:
        local(g).mul_(coef.to(g.dtype))
    return total


def _gather_rows(t: torch.Tensor, ep: EPMesh) -> torch.Tensor:
    """The full stack (E, ...) from this rank's shard (E/ep, ...): a DTensor is gathered over its
    replicas first, then the shards along the EP row."""
    full = getattr(t, "full_tensor", None)
    t = (full() if callable(full) else t).detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(ep.ep)]
    dist.all_gather(parts, t, group=ep.ep_group)
    return torch.cat(parts)


def gather_expert_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ep: EPMesh | None,
                        model_state: dict, optim_state: dict, *, keep: bool) -> None:
    """Replace the expert entries of a full model / optimizer state dict (rank 0's, from
    `get_model_state_dict`) by the full stacks gathered from every rank; all ranks must call it,
    `keep` says whether this rank holds the dicts (rank 0)."""
    if ep is None:
        return
    for name, p in zip(expert_param_names(model), _expert_params(model), strict=True):
        full = _gather_rows(p, ep)
        if keep:
            model_state[name] = full.cpu()
        st = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                full = _gather_rows(st[key], ep)
                if keep:
                    optim_state["state"][name][key] = full.cpu()


def shard_expert_state(model: nn.Module, ep: EPMesh | None, model_state: dict, optim_state: dict) -> None:
    """Slice the expert entries of full model / optimizer state dicts down to this rank's shard (in place)."""
    if ep is None:
        return
    n = model.cfg.n_routed_experts // ep.ep
    rows = slice(ep.ep_rank * n, (ep.ep_rank + 1) * n)
    for name in expert_param_names(model):
        model_state[name] = model_state[name][rows]
        st = optim_state.get("state", {}).get(name)
        for key in ("exp_avg", "exp_avg_sq"):
            if st is not None and key in st:
                st[key] = st[key][rows]


@contextlib.contextmanager
def no_grad_sync(module: nn.Module, skip: bool) -> Iterator[None]:
    """Inside, backward does not synchronise gradients (the non-final micro-batches of an accumulation)."""
    if not skip:
        yield
        return
    if hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
        return
    yield


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum / max / avg via sum) across ranks; a no-op with one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if op == "max":
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            if op == "avg":
                t /= dist.get_world_size()
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (a one-element list with one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2 norms), or the tensor itself."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t
