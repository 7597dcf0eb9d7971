"""``torch.distributed`` set-up for data-parallel training (launched by ``torchrun``).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in
every process; :func:`init_distributed` reads them and starts the process group: NCCL when the
device is CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on the CPU. Without those variables
(or with ``WORLD_SIZE=1``) it starts nothing and returns a single-process context, so the same code
runs under ``kedro run`` unchanged.

Batch-coupled operations (for exact data-parallel maths, see ``DetailTrainer``):

* BatchNorm layers (``norm: batch`` in the model configs) are converted to ``SyncBatchNorm`` so the
  statistics are those of the global batch (CUDA only: torch has no CPU SyncBatchNorm, so a CPU
  DDP run with batch norm is refused); the shipped configs use instance norm (per sample, nothing
  to synchronise). The discriminator step scores real and fake images in one forward (one DDP
  forward per backward), so a batch-norm D normalises them together.
* Dropout (``model.dropout`` > 0; 0 in the shipped configs) draws its masks from the process RNG:
  each rank seeds torch with ``seed + rank`` after the models are built (identical initial weights,
  which DDP also broadcasts from rank 0; independent masks per rank). The masks then differ from a
  single process with the same global batch, so dropout runs are equivalent in distribution only.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from facedetail.utils import resolve_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the data-parallel group (``world_size == 1``: no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when gradients must be all-reduced (a process group of more than one rank)."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (``(0, 1, 0)`` without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(device: str | torch.device = "auto", backend: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Start the process group from torchrun's environment and pick this rank's device.

    Args:
        device: the ``device`` parameter (``auto``, ``cpu``, ``cuda``); CUDA becomes ``cuda:LOCAL_RANK``.
        backend: ``nccl``/``gloo``; default NCCL on CUDA, gloo on the CPU.
        timeout_s: collective timeout (a rank that dies makes the others fail after this, not hang forever).
    """
    rank, world_size, local_rank = env_world()
    torch_device = resolve_device(device)
    if torch_device.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    if world_size <= 1:
        return DistContext(0, 1, 0, torch_device, None)
    backend = backend or ("nccl" if torch_device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("rank %d/%d (local %d) on %s, backend %s", rank, world_size, local_rank, torch_device, backend)
    return DistContext(rank, world_size, local_rank, torch_device, backend)


def single_process(device: torch.device) -> DistContext:
    """The context of an ordinary single-process run."""
    return DistContext(0, 1, 0, device, None)


def is_main_process() -> bool:
    """True on rank 0, and in any process that is not part of a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cleanup() -> None:
    """Destroy the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over the ranks (in place; a no-op in a single process)."""
    if ctx.enabled:
        if ctx.backend == "nccl" and tensor.device.type != "cuda":  # NCCL reduces CUDA tensors only
            on_device = tensor.to(ctx.device)
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            tensor.copy_(on_device.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_true(flag: bool, ctx: DistContext) -> bool:
    """``flag`` AND-ed over the ranks (every rank must call it: a collective decision)."""
    if not ctx.enabled:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; small objects only)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``module`` in ``DistributedDataParallel`` (BatchNorm converted to SyncBatchNorm), or as is in a single process."""
    if not ctx.enabled:
        return module
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        if ctx.device.type == "cpu":
            raise ValueError("norm 'batch' under DDP needs SyncBatchNorm, which torch supports on GPUs only: "
                             "use norm 'instance' (the shipped configs) for multi-process CPU training")
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # converts the children in place
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
