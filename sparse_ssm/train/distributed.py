"""The processes of a run: one without torchrun, or one per device under torchrun.

    procs = Processes.start(config.training)      # joins the process group under torchrun
    procs.main                                    # rank 0: the only one that writes files and logs
    procs.all_reduce(value, "sum" | "min" | "max"), procs.barrier()
    model, train_forward = procs.wrap(model, ...) # DDP or FSDP2 (fully_shard per block)
    procs.shutdown()                              # after the DDP wrapper is released

Under torchrun (WORLD_SIZE > 1) the process group is NCCL on CUDA and gloo on CPU, with
`training.distributed_timeout_s` so that a lost rank ends the job instead of hanging it.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..util.device import resolve_device
from .config import TrainingConfig

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


@dataclass
class Processes:
    rank: int
    world: int
    device: torch.device
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, tc: TrainingConfig) -> "Processes":
        device = resolve_device(tc.device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=tc.distributed_timeout_s))
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return cls(dist.get_rank(), dist.get_world_size(), device, fsdp=tc.distributed == "fsdp")

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, value: float, op: str = "sum") -> float:
        """`value` reduced over the processes (itself in a single process)."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=_OPS[op])
        return float(t)

    def main_first(self, work):
        """Run `work()` on the main process first (it fills caches and writes files), then on the
        others; every process returns its own result."""
        if not self.main:
            self.barrier()
        result = work()
        if self.main:
            self.barrier()
        return result

    def shard(self, items: list) -> list:
        """This process's share of `items` (every world-th from its rank)."""
        return items[self.rank::self.world]

    def wrap(self, model: torch.nn.Module, compile: bool = False):
        """(forward, train_forward): the callables that run the model, compiled and wrapped in DDP
        (train_forward only) or sharded in place with FSDP2 (both)."""
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        forward = torch.compile(model) if compile else model
        if self.world == 1 or self.fsdp:
            return forward, forward
        from torch.nn.parallel import DistributedDataParallel
        ddp = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        return forward, (torch.compile(ddp) if compile else ddp)

    def no_sync(self, train_forward, last_micro_step: bool, model):
        """Context for a micro-step's backward: gradients are all-reduced on the last one only."""
        from contextlib import nullcontext
        if self.world == 1:
            return nullcontext()
        if self.fsdp:
            model.set_requires_gradient_sync(last_micro_step)
            return nullcontext()
        ddp = getattr(train_forward, "_orig_mod", train_forward)
        return nullcontext() if last_micro_step else ddp.no_sync()


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined.  Call it after the objects that hold it (the
    DistributedDataParallel wrapper) are released: with one still alive at interpreter exit, gloo
    tears its threads down late and the process aborts ("terminate called without an active
    exception"; seen in about half of 2-rank CPU runs on a busy machine)."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
