"""Which process this is: the one place rank and world size are read.

torchrun and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK (MPI launchers PMI_*);
an `accelerate.Accelerator`, where a caller holds one, reads the same variables and is asked
directly so that a process group it set up itself is honoured."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def process_info(accelerator=None) -> ProcessInfo:
    """This process's rank, world size and local rank (0, 1, 0 when not launched distributed)."""
    if accelerator is not None:
        return ProcessInfo(accelerator.process_index, accelerator.num_processes, accelerator.local_process_index)
    rank = int(os.environ.get("RANK", os.environ.get("PMI_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("PMI_SIZE", 1)))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return ProcessInfo(rank, world, local)
