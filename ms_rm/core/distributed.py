"""Runs across devices with MindSpore's own distributed runtime (msrun; HCCL on Ascend, mccl on the CPU).

A process started by msrun (`MS_ROLE` in its environment) joins the job with `init_world()`, which
must run before anything with side effects: msrun also starts the script as the scheduler
(`MS_ROLE=MS_SCHED`), where MindSpore's `init()` serves the job and never returns. Outside msrun
the world is one process and every collective below is the identity.

What is used, all float32 (what the CPU backend reduces; Ascend the same): `ops.AllGather` to
collect each rank's rows, `ops.AllReduce` (sum) to average gradients. Each rank takes a
contiguous shard of the rows (`shard`), so gathering puts them back in order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank in 0..size-1."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """The rank that writes outputs and logs."""
        return self.rank == 0

    def shard(self, count: int) -> slice:
        """This rank's contiguous rows of `count` (sizes differ by at most one, lower ranks first)."""
        return shard_bounds(count, self.size)[self.rank]

    def gather_rows(self, array: np.ndarray, count: int) -> np.ndarray:
        """Every rank's shard of a (count, ...) float array, gathered in rank order: the whole array."""
        array = np.asarray(array, np.float32)
        if self.size == 1:
            return array
        from mindspore import Tensor, ops

        bounds = shard_bounds(count, self.size)
        longest = max(b.stop - b.start for b in bounds)
        padded = np.zeros((longest,) + array.shape[1:], np.float32)    # AllGather needs equal shapes
        padded[:array.shape[0]] = array
        gathered = ops.AllGather()(Tensor(padded)).asnumpy().reshape((self.size, longest) + array.shape[1:])
        return np.concatenate([gathered[r, :b.stop - b.start] for r, b in enumerate(bounds)])

    def barrier(self) -> None:
        """Wait until every rank is here (a gather of one number): what the main rank wrote before
        it is on disk when any rank goes on."""
        if self.size > 1:
            self.gather_rows(np.zeros((1, 1), np.float32), self.size)

    def mean(self, tensors: Sequence) -> Tuple:
        """The mean over ranks of each tensor (float32 AllReduce sum / size): gradients, losses."""
        if self.size == 1:
            return tuple(tensors)
        from mindspore import ops

        reduce = ops.AllReduce()
        return tuple(reduce(t) / self.size for t in tensors)


def shard_bounds(count: int, size: int) -> List[slice]:
    """`count` rows cut into `size` contiguous shards, lower ranks one longer when it does not divide."""
    base, extra = divmod(count, size)
    bounds, start = [], 0
    for rank in range(size):
        stop = start + base + (rank < extra)
        bounds.append(slice(start, stop))
        start = stop
    return bounds


def launched_by_msrun() -> bool:
    return "MS_ROLE" in os.environ


def init_world() -> World:
    """Join the msrun job (one World of one process outside msrun). Call it first: the scheduler
    process never returns from it."""
    if not launched_by_msrun():
        return World()
    from mindspore.communication import get_group_size, get_rank, init

    init()                                 # HCCL on Ascend, mccl on the CPU; the scheduler stays here
    world = World(get_rank(), get_group_size())
    logger.debug("rank %d of %d joined", world.rank, world.size)
    return world
