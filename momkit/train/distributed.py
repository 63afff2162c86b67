"""Data-parallel training under ``torchrun``: the process group, batch shards and global sums.

``torchrun --nproc_per_node N -m momkit train CONFIG`` starts N processes (ranks) that train one
model with DistributedDataParallel. Every rank builds the same global batch of ``optim.batch_size``
sequences and trains on its own contiguous shard of ``batch_size / N`` sequences; the losses are
means over the global batch (``global_sum``), so a run's parameters do not depend on N. NCCL on
CUDA, gloo on CPU. Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing here is used.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from momkit.config import ConfigError

Tensor = torch.Tensor


def launched_world_size() -> int:
    """The number of ranks torchrun started (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@dataclass
class DataParallel:
    """This process's place in a data-parallel job."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # the process group was created here (and is destroyed by ``close``)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch [B, ...] (B divisible by the world size)."""
        n = batch.shape[0] // self.world_size
        return batch[self.rank * n:(self.rank + 1) * n]

    def global_sum(self, local: Tensor) -> Tensor:
        """The sum over ranks of ``local`` (a 1-D float tensor of per-rank sums).

        The value is the global sum; the gradient flows into this rank's ``local`` only, scaled by the
        world size, because DistributedDataParallel averages gradients over ranks: the average of the
        ranks' scaled gradients is the gradient of the global loss."""
        total = local.detach().clone()
        dist.all_reduce(total)
        scaled = local * self.world_size
        return scaled + (total - scaled).detach()

    def sum_(self, values: Tensor) -> Tensor:
        """Sum ``values`` over ranks in place (no gradient); returns it."""
        dist.all_reduce(values)
        return values

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (a small picklable object: metrics, a decision)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def data_parallel(device_name: str, batch_size: int, timeout_s: float) -> DataParallel | None:
    """The data-parallel job this process belongs to, or None when it runs alone (no torchrun).

    Starts the process group (NCCL on CUDA, gloo on CPU; ``timeout_s`` bounds every collective, so a
    rank that stops answering ends the job instead of hanging it) unless one exists already."""
    world = launched_world_size()
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if batch_size % world:
        raise ConfigError(f"optim.batch_size={batch_size} is invalid with {world} ranks (torchrun --nproc_per_node "
                          f"x nodes): the global batch is split evenly, so it must be a multiple of {world}")
    if device_name.startswith("cuda:"):
        raise ConfigError(f"run.device={device_name!r} is invalid under torchrun: each rank takes the GPU of its "
                          "LOCAL_RANK; use auto, cuda or cpu")
    if device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={device_name!r} is invalid: CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                              "start at most that many processes per node (torchrun --nproc_per_node)")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns)


def reduce_router_loads(model: torch.nn.Module, dp: DataParallel) -> None:
    """Sum over ranks the load that bias-balanced routers (``topk_sigmoid``) saw since their last update,
    so that every rank nudges its biases by the global load (one collective for all layers)."""
    loads = [m.load_since_update for m in model.modules() if isinstance(getattr(m, "load_since_update", None), Tensor)]
    if not loads:
        return
    flat = dp.sum_(torch.cat(loads))
    for buf, new in zip(loads, flat.split([b.numel() for b in loads])):
        buf.copy_(new)
