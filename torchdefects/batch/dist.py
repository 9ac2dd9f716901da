"""Many processes under ``torchrun``: ranks, sharding, barriers, shared totals.

With ``WORLD_SIZE > 1`` rank ``R`` takes inputs ``R, R + WORLD_SIZE, ...`` and writes its
own rank files; rank 0 holds the folder's lock, prepares the folder, and merges. The
process group uses gloo: it carries only barriers, one broadcast and one sum.
"""

import os
from typing import Any, List, NamedTuple, Optional, Sequence

__all__ = ["Ranks", "all_sum", "barrier", "broadcast", "finish", "ranks", "start"]


class Ranks(NamedTuple):
    """This process's place: ``world`` processes, this is ``rank`` (``local_rank`` on its
    machine); ``distributed`` when ``world > 1``."""

    world: int
    rank: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> range:
        """The input indices of this rank, ascending."""
        return range(self.rank, n, self.world)


def ranks() -> Ranks:
    """From the ``torchrun`` environment (one process when it is absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return Ranks(world, rank, int(os.environ.get("LOCAL_RANK", str(rank))))


def start(r: Ranks) -> None:
    """Join the process group (gloo) when distributed."""
    if not r.distributed:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", init_method="env://")


def barrier(r: Ranks) -> None:
    if r.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast(r: Ranks, value: Optional[Any]) -> Optional[Any]:
    """Rank 0's ``value`` on every rank (e.g. a start-up error message)."""
    if not r.distributed:
        return value
    import torch.distributed as dist

    box: List[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(r: Ranks, values: Sequence[int]) -> List[int]:
    """Element-wise sum of ``values`` over the ranks."""
    if not r.distributed:
        return [int(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def finish(r: Ranks) -> None:
    """Leave the process group."""
    if r.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
