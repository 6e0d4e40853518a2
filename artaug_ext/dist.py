"""Which process this is: the one place rank and world size are read.

torchrun and `accelerate launch` set RANK / WORLD_SIZE / LOCAL_RANK (MPI launchers PMI_*);
an `accelerate.Accelerator`, where a caller holds one, reads the same variables and is asked
directly so that a process group it set up itself is honoured. `Collective` is how the processes
of one launch agree: one folder lock for all of them, and a check that they share the folder.
`Launch` is what a command holds for the whole launch, before torch is imported: the folder
lock taken at once, and the heartbeat that lets the survivors name a rank that stopped."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

from .errors import PeerLostError, RunLockedError, UsageError
from .files import FolderLock, atomic_write_bytes, held_lock


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

    def __init__(self, accelerator=None, info: ProcessInfo | None = None, launch: Launch | None = None):
        self.accelerator = accelerator
        self.info = info or process_info(accelerator)
        self.launch = launch

    def _dist(self):
        from datetime import timedelta

        import torch.distributed as dist

        if not dist.is_initialized():
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise UsageError(f"WORLD_SIZE={self.info.world} but {' and '.join(missing)} not set: start the "
                                 "processes with torchrun or accelerate launch")
            timeout = self.launch.timeout if self.launch else DEFAULT_COLLECTIVE_TIMEOUT
            dist.init_process_group("gloo", rank=self.info.rank, world_size=self.info.world,
                                    timeout=timedelta(seconds=timeout))
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
    early = collective.launch.lock(folder, name) if collective.launch else None
    collective.on_main(lambda: taken.append(early or FolderLock(folder, name, what).acquire()))
    return taken[0] if taken else None


# ------------------------------------------------------------------------------- the launch

# How long a collective waits for a rank that does not answer (torch's own default for gloo):
# a hung peer ends the launch in bounded time. `--collective-timeout` on the commands sets it.
DEFAULT_COLLECTIVE_TIMEOUT = 1800
GATE_SECONDS = 10.0  # how long a rank waits to see its main process hold the folder's lock
BEAT_SECONDS = 1.0  # how often each rank of a launch writes its heartbeat
# A rank whose heartbeat has not moved for this long stopped: the others end at once, even far
# from their next collective (a long share of generation), instead of at that collective.
STALE_SECONDS = 30.0
RANKS_DIR = ".artaug-ranks"  # the heartbeats, in the shared folder


def launch_id() -> str:
    """What the processes of one launch share and no other live launch has: the rendezvous
    address (a live launch holds its port) and the launcher's job id; outside a launch, the
    process itself."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port):
        return f"process {os.getpid()} on {socket.gethostname()}"
    job = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or ""
    return f"launch {addr}:{port} {job}".strip()


class Launch:
    """What one command holds for its whole launch, from before torch is imported: the folder
    lock (the main process takes it; every other rank waits until it sees it held by its own
    launch, or refuses with the same message when another live launch holds it), the heartbeat
    of every rank in the shared folder, what the command is doing, and the collectives' timeout.
    When a collective loses a peer, `lost_peer` names the rank that stopped and what was going on."""

    def __init__(self, info: ProcessInfo | None = None, timeout: float = DEFAULT_COLLECTIVE_TIMEOUT):
        self.info = info or process_info()
        self.timeout = timeout
        self.id = launch_id()
        self.doing = ""  # e.g. "stage 2 of round 1": set by the command as it goes
        self._locks: dict[str, FolderLock] = {}
        self.heartbeat: Heartbeat | None = None
        self.quiet_peer: str | None = None  # what the heartbeat's thread saw of a rank that stopped
        self._interrupting = False  # the heartbeat's thread asked the main thread to stop
        self._sigint = None  # the SIGINT handler ours replaced while the heartbeat watches (restored in close)

    def open_folder(self, folder: str, name: str, what: str = "run folder") -> None:
        """Take (main process) or wait for (other ranks) the launch's lock on `folder`, then beat there."""
        os.makedirs(folder, exist_ok=True)
        if self.info.main:
            lock = FolderLock(folder, name, what, owner=self.id).acquire(retry_seconds=0.2 if self.info.world > 1 else 0)
            self._locks[os.path.abspath(lock.path)] = lock
        elif not self._wait_for_main(FolderLock(folder, name, what)):
            return  # not seen in time: the collective's lock and shared-folder check decide
        if self.info.world > 1 and self.heartbeat is None:
            self.heartbeat = Heartbeat(folder, self.info, self.id, on_stale=self._peer_went_quiet)
            if self.info.main:
                self.heartbeat.drop_other_launches()
            self._catch_sigint()
            self.heartbeat.start()

    def _wait_for_main(self, lock: FolderLock) -> bool:
        """Until the lock is held by this launch (True), or GATE_SECONDS pass (False); another live
        launch holding it (seen for 0.2 s, far longer than our main process takes to write it) is
        refused here with the message the main process gives."""
        deadline = time.monotonic() + GATE_SECONDS
        foreign_since = None
        while time.monotonic() < deadline:
            lines = held_lock(lock.path)
            if lines and lines[1:2] == [self.id]:
                return True
            if lines:
                foreign_since = foreign_since or time.monotonic()
                if time.monotonic() - foreign_since > 0.2:
                    raise lock.refusal(lines[0])
            else:
                foreign_since = None
            time.sleep(0.05)
        return False

    def _peer_went_quiet(self, rank: int, state: str) -> None:
        """From the heartbeat's thread: stop the main thread wherever it is (KeyboardInterrupt
        there, once it is back in Python; the command tells it from the user's by `quiet_peer`)."""
        import _thread

        self.quiet_peer = f"no heartbeat for {STALE_SECONDS:g} s" if state == "running" else "its heartbeat said so"
        self._interrupting = True
        _thread.interrupt_main(signal.SIGINT)  # calls the SIGINT handler: ours, or Python's default one

    def _catch_sigint(self) -> None:
        """From the main thread: a SIGINT handler that raises KeyboardInterrupt when the heartbeat's
        thread asks, whatever SIGINT's disposition was. `interrupt_main` does nothing when SIGINT is
        ignored (SIG_IGN: a rank started in the background of a script, and every process it
        starts, inherit that) or left to the system (SIG_DFL). A real SIGINT does what it did before:
        the earlier Python handler, nothing (SIG_IGN), or the system's default (SIG_DFL)."""
        if threading.current_thread() is not threading.main_thread() or self._sigint is not None:
            return
        before = signal.getsignal(signal.SIGINT)
        if before is None:  # a handler installed outside Python: left alone (interrupt_main calls it)
            return

        def handler(signum, frame):
            if self._interrupting:
                self._interrupting = False
                raise KeyboardInterrupt
            if callable(before):
                return before(signum, frame)
            if before == signal.SIG_DFL:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
            # SIG_IGN: ignored, as before

        signal.signal(signal.SIGINT, handler)
        self._sigint = (before, handler)

    def _restore_sigint(self) -> None:
        """SIGINT's handler as it was before `open_folder` (main thread; left as it is when another
        handler replaced ours since)."""
        if self._sigint is None or threading.current_thread() is not threading.main_thread():
            return
        before, ours = self._sigint
        self._sigint = None
        if signal.getsignal(signal.SIGINT) is ours:
            signal.signal(signal.SIGINT, before)

    def stop_watching(self) -> None:
        """No more interruptions from the heartbeat's thread (the command is ending)."""
        if self.heartbeat is not None:
            self.heartbeat.on_stale = None

    def lock(self, folder: str, name: str) -> FolderLock | None:
        """The lock on `folder` this process took in `open_folder`, handed over (None if none)."""
        return self._locks.pop(os.path.abspath(os.path.join(folder, name)), None)

    def close(self, state: str | None = None) -> None:
        """The end of this process's part: the heartbeat's last word (`state`: failed, terminated;
        None: done, the file removed) and the locks not handed over released."""
        self.stop_watching()
        if self.heartbeat is not None:
            self.heartbeat.end(state)
            self.heartbeat = None
        self._restore_sigint()
        for lock in self._locks.values():
            lock.release()
        self._locks.clear()

    def lost_peer(self, cause: str) -> PeerLostError:
        """The one-line error of a launch whose collective lost a peer (`cause`: what the collective
        said, e.g. "connection closed"), naming the rank that stopped where the heartbeats tell."""
        who = self._who() or f"a process of the launch ({self.info.world} in all) stopped answering"
        return PeerLostError(f"{who} ({cause} during {self.doing or 'the run'}); nothing finished was lost: "
                             "run the same command again to resume")

    def stopped_by_launcher(self) -> PeerLostError:
        """The error of a rank its launcher terminated (torchrun's agent stops every rank when one
        fails): which rank failed first, where the heartbeats tell."""
        if self.heartbeat is not None:
            self.heartbeat.set_state("terminated")
        who = self._who()
        return PeerLostError(f"stopped by the launcher (SIGTERM) during {self.doing or 'the run'}"
                             + (f", after {who}" if who else "")
                             + "; nothing finished was lost: run the same command again to resume")

    def _who(self) -> str | None:
        """Which other ranks stopped (killed, or ended on an error), from their heartbeats."""
        if self.heartbeat is None:
            return None
        states = self.heartbeat.peers()
        failed = [r for r, s in states.items() if s == "failed"]
        stopped = [r for r, s in states.items() if s == "stopped"]
        if failed:
            return f"rank {_ranks(failed)} of {self.info.world} stopped on an error (its own message names it)"
        if stopped:
            return f"rank {_ranks(stopped)} of {self.info.world} stopped"
        return None


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


class Heartbeat:
    """This rank's heartbeat, a counter it rewrites every BEAT_SECONDS in the shared folder
    (`{folder}/.artaug-ranks/{launch}-rank-N`), from a thread, whatever the main thread does.
    A rank killed by SIGKILL stops beating; one that ends on an error, or is terminated by its
    launcher, writes that as its last word. The survivors of a lost peer read who stopped; with
    `on_stale`, the thread also watches the others and calls it once with the first rank whose
    running heartbeat has not moved for STALE_SECONDS, or that ended on an error (a rank that ended
    well removed its file; one its launcher terminated, or that lost a peer, is not the cause)."""

    def __init__(self, folder: str, info: ProcessInfo, launch: str, on_stale=None):
        self.dir = os.path.join(folder, RANKS_DIR)
        self.key = hashlib.sha256(launch.encode()).hexdigest()[:12]
        self.info = info
        self.state, self.count = "running", 0
        self.on_stale = on_stale
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (its last count, when it last moved)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, rank: int) -> str:
        return os.path.join(self.dir, f"{self.key}-rank-{rank}")

    def drop_other_launches(self) -> None:
        """On the main process, under the folder's lock: the heartbeats of earlier launches go."""
        if os.path.isdir(self.dir):
            for name in os.listdir(self.dir):
                if not name.startswith(self.key):
                    _remove(os.path.join(self.dir, name))

    def start(self) -> None:
        self._write()
        self._thread = threading.Thread(target=self._run, name="artaug-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(BEAT_SECONDS):
            self._write()
            if self.on_stale is not None:
                self._watch()

    def _watch(self) -> None:
        now = time.monotonic()
        for rank, (state, count) in self._read().items():
            if rank == self.info.rank:
                continue
            last, since = self._seen.get(rank, (None, now))
            if count != last:
                self._seen[rank] = (count, now)
            if state == "failed" or (state == "running" and count == last and now - since > STALE_SECONDS):
                on_stale, self.on_stale = self.on_stale, None  # once
                if on_stale is not None:
                    on_stale(rank, state)
                return

    def _write(self) -> None:
        self.count += 1
        path = self.path(self.info.rank)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # the thread's beat and the main thread's last word
        try:
            os.makedirs(self.dir, exist_ok=True)
            with open(tmp, "w", encoding="ascii") as f:
                f.write(f"{self.state} {self.count}")
            os.replace(tmp, path)
        except OSError:
            pass  # a heartbeat that cannot be written only makes a lost peer harder to name

    def set_state(self, state: str) -> None:
        self.state = state
        self._write()

    def end(self, state: str | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if state is None:
            _remove(self.path(self.info.rank))
            if self.info.main:
                try:
                    os.rmdir(self.dir)
                except OSError:
                    pass  # another rank's heartbeat is still there: the next launch removes it
        else:
            self.set_state(state)

    def _read(self) -> dict[int, tuple[str, int]]:
        out = {}
        for rank in range(self.info.world):
            try:
                with open(self.path(rank), encoding="ascii") as f:
                    state, count = f.read().split()
                out[rank] = (state, int(count))
            except (OSError, ValueError):
                pass
        return out

    def peers(self) -> dict[int, str]:
        """Every other rank's state: running, stopped (no beat for 2.5 beats, or none at all),
        failed, terminated. Takes 2.5 beats."""
        before = self._read()
        time.sleep(2.5 * BEAT_SECONDS)
        after = self._read()
        out = {}
        for rank in range(self.info.world):
            if rank == self.info.rank:
                continue
            state, count = after.get(rank, ("stopped", 0))
            if state == "running" and before.get(rank, (state, count))[1] == count:
                state = "stopped"
            out[rank] = state
        return out


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# What a collective's error says when a peer is gone (gloo, NCCL and torch's stores word it so).
_LOST_PEER_WORDS = {"connection closed": ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                          "Socket closed", "Connection refused"),
                    "no answer in time": ("Timed out", "timed out", "Timeout", "timeout")}


def peer_failure(error: BaseException, timeout: float = DEFAULT_COLLECTIVE_TIMEOUT) -> str | None:
    """What `error` says happened to the launch when it is a collective that lost a peer
    ("connection closed", "no answer within the collective timeout of N s"); None for any
    other error (those keep their own message or traceback)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    dist_error = getattr(torch.distributed, "DistError", None)
    collective = (dist_error is not None and isinstance(error, dist_error)) or any(
        word in text for word in ("gloo", "Gloo", "NCCL", "ProcessGroup", "c10d", "TCPStore"))
    if not collective:
        return None
    for cause, words in _LOST_PEER_WORDS.items():
        if any(w in text for w in words):
            return cause if cause != "no answer in time" else f"no answer within the collective timeout of {timeout:g} s"
    return "the collective failed"
