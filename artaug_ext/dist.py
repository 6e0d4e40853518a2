"""Which process this is: the one place rank and world size are read.

torchrun and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK (MPI launchers PMI_*);
an `accelerate.Accelerator`, where a caller holds one, reads the same variables and is asked
directly so that a process group it set up itself is honoured. `Collective` is how the processes
of one launch agree: one folder lock for all of them, and a check that they share the folder."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass

from .errors import RunLockedError, UsageError
from .files import FolderLock, atomic_write_bytes


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


SHARED_CHECK_SECONDS = 5.0  # how long a rank retries reading the main process's file (a slow shared filesystem)


class Collective:
    """Barrier, broadcast and gather between the processes of one launch (no-ops in one process).

    Built on the caller's accelerate `Accelerator` where there is one, else on torch.distributed:
    the default process group if one is set up, or a gloo group from the launcher's environment
    (MASTER_ADDR / MASTER_PORT, set by torchrun and `accelerate launch`). gloo carries these few
    small objects on CPU whatever device the work runs on."""

    def __init__(self, accelerator=None, info: ProcessInfo | None = None):
        self.accelerator = accelerator
        self.info = info or process_info(accelerator)

    def _dist(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise UsageError(f"WORLD_SIZE={self.info.world} but {' and '.join(missing)} not set: start the "
                                 "processes with torchrun or accelerate launch")
            dist.init_process_group("gloo", rank=self.info.rank, world_size=self.info.world)
        return dist

    def barrier(self) -> None:
        if self.info.world == 1:
            return
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        else:
            self._dist().barrier()

    def broadcast(self, obj):
        """The main process's `obj`, on every process."""
        if self.info.world == 1:
            return obj
        if self.accelerator is not None:
            from accelerate.utils import broadcast_object_list

            return broadcast_object_list([obj], from_process=0)[0]
        box = [obj]
        self._dist().broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if self.info.world == 1:
            return [obj]
        if self.accelerator is not None:
            from accelerate.utils import gather_object

            return list(gather_object([obj]))
        out = [None] * self.info.world
        self._dist().all_gather_object(out, obj)
        return out

    def on_main(self, fn) -> None:
        """`fn()` on the main process alone (work on shared files that two ranks must not do at
        once), then every rank goes on; if it raised, every rank raises: the main process its
        error, the others its message (a rank left waiting in a collective would hang)."""
        failure = error = None
        if self.info.main:
            try:
                fn()
            except Exception as e:  # noqa: BLE001  (any error: the other ranks must hear of it)
                failure, error = (type(e).__name__, str(e)), e
        failure = self.broadcast(failure)
        if error is not None:
            raise error
        if failure:
            raise (RunLockedError if failure[0] == RunLockedError.__name__ else UsageError)(failure[1])

    def check_shared_folder(self, folder: str, option: str = "--out") -> None:
        """Every process sees the same `folder`: ranks read each other's files there (caches,
        checkpoints, images), so node-local folders would break a run hours in. The main process
        writes a file with a fresh name (no stale cache entry can hide it), every rank reads it."""
        if self.info.world == 1:
            return
        token = self.broadcast(secrets.token_hex(8) if self.info.main else None)
        path = os.path.join(folder, f".artaug-shared-check-{token}")
        self.on_main(lambda: atomic_write_bytes(path, token.encode()))
        deadline = time.monotonic() + SHARED_CHECK_SECONDS
        while True:
            try:
                with open(path, encoding="ascii") as f:
                    seen = f.read() == token
            except OSError:
                seen = False
            if seen or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        sees = self.gather(seen)
        if self.info.main:
            os.remove(path)
        blind = [rank for rank, ok in enumerate(sees) if not ok]
        if blind:
            raise UsageError(f"{option} {folder} is not one folder for every process: rank(s) {', '.join(map(str, blind))} "
                             f"of {self.info.world} do not see the file the main process wrote there; put {option} "
                             "on a filesystem every node sees")


def lock_folder(folder: str, collective: Collective, name: str, what: str = "run folder") -> FolderLock | None:
    """One lock on `folder` for a whole launch, whatever its world size: the main process takes
    it before any rank writes, and every rank learns the outcome, so a second run of any world
    size is refused on every one of its ranks. Returns the lock on the main process (None on
    the others); the caller releases it."""
    taken = []
    collective.on_main(lambda: taken.append(FolderLock(folder, name, what).acquire()))
    return taken[0] if taken else None
