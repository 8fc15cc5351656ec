"""The order of training: which windows form each micro-batch of each optimizer step.

Every epoch has its own seeded permutation of the training windows (the same on every process),
cut into global micro-batches of batch_size x processes windows; each process takes its share.
The position (epoch, micro-batch within it) is part of the loop state, so a resumed run reads
exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import torch

from .distributed import Processes


class EpochBatches:
    def __init__(self, num_windows: int, seed: int, batch_size: int, accumulation: int, procs: Processes):
        self.num_windows, self.seed, self.batch_size, self.accumulation = num_windows, seed, batch_size, accumulation
        self.procs = procs
        self.global_batch = batch_size * procs.world

    def steps_per_epoch(self) -> int:
        return -(-self.num_windows // (self.global_batch * self.accumulation))

    def epoch(self, epoch: int) -> list[torch.Tensor]:
        """This process's share of every global micro-batch of an epoch (under torchrun the last
        incomplete global batch is dropped so that every share is full)."""
        order = torch.randperm(self.num_windows, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        gb, bs, rank = self.global_batch, self.batch_size, self.procs.rank
        batches = [order[i:i + gb] for i in range(0, len(order), gb)]
        if self.procs.world > 1 and len(batches[-1]) < gb:
            batches.pop()
        return [b[rank * bs:(rank + 1) * bs] for b in batches]

    def groups(self, state, end: int, stopped):
        """The micro-batches of each optimizer step until `state.step` reaches `end` or `stopped()`,
        advancing `state.epoch` / `state.micro_batch`."""
        while state.step < end and not stopped():
            batches = self.epoch(state.epoch)
            while state.micro_batch < len(batches) and state.step < end:
                group = batches[state.micro_batch:state.micro_batch + self.accumulation]
                state.micro_batch += len(group)
                yield group
            if state.micro_batch >= len(batches):
                state.epoch, state.micro_batch = state.epoch + 1, 0
