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
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


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
        raise ValueError("distributed.backend nccl needs GPUs; use gloo (or auto) on CPU")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world_size} but no MASTER_ADDR: start several processes with torchrun")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    log.info("process group: rank %d/%d (local %d), backend %s, device %s", rank, world_size, local_rank,
             backend, device)
    return DistEnv(rank, world_size, local_rank, device, backend)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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


def parallelize(model: nn.Module, env: DistEnv, strategy: str, *, reshard_after_forward: bool = True) -> nn.Module:
    """The module to train through: `LossModule(model)`, wrapped in DDP or sharded with FSDP2."""
    module = LossModule(model)
    if not env.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(module, device_ids=ids, broadcast_buffers=False)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # MTP modules run through `forward_mtp` and their head norm is applied outside it, so they stay
        # in the root's group (gathered for the whole forward) instead of getting hooks of their own.
        for block in model.layers:
            fully_shard(block, reshard_after_forward=reshard_after_forward)
        fully_shard(module, reshard_after_forward=reshard_after_forward)
        return module
    raise ValueError(f"unknown distributed.strategy {strategy!r}; use ddp or fsdp")


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
