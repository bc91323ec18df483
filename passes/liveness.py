"""Which ranks of a ``torchrun`` job are alive: heartbeats in the job's store.

A gloo collective can only time out; it cannot tell a rank that is frozen (``SIGSTOP``,
stuck in the kernel, dead, its machine gone) from one that is slow. So every rank that
:func:`~torchgraft.passes.parallelize.init_distributed` joins runs a :class:`Heartbeat`: a
daemon thread that adds 1 to the rank's counter in the job's TCPStore (its own client
connection) every :data:`HEARTBEAT_S`. The thread runs whatever the main thread does
(compiling, a long step, a checkpoint save, waiting in a collective), so a counter that
stops moving means the whole process stopped.

The thread also watches the other ranks on its host. One whose counter has not moved for
the current collective timeout (at least :data:`MIN_STALE_S`) is named on stderr, by one
rank, and ended with ``SIGKILL``. ``torchrun`` would end it too, but only after a
``SIGTERM`` that a stopped process cannot act on and its fixed 30 s grace; killed now, the
collective waiting on it fails at once and the job ends within the timeout. Ranks on other
hosts are left to the ranks of their own host; when a collective fails,
:func:`unresponsive_ranks` samples every counter and names the ranks that stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

__all__ = [
    "HEARTBEAT_S",
    "MIN_STALE_S",
    "Heartbeat",
    "RankPlace",
    "process_start",
    "unresponsive_ranks",
]

HEARTBEAT_S = 1.0
"""Seconds between two beats of a rank's counter."""
MIN_STALE_S = 5.0
"""A counter is judged stopped only after at least this long, whatever the timeout."""
_STORE_TIMEOUT = timedelta(seconds=5)
_STORE_ERRORS = (RuntimeError, OSError, dist.DistError)


@dataclasses.dataclass(frozen=True)
class RankPlace:
    """Where a rank runs: its host name, process id and the process's start time (clock
    ticks since boot, from ``/proc``; ``None`` where there is no ``/proc``), which tells the
    rank's process from a later one given the same pid."""

    rank: int
    host: str
    pid: int
    started: int | None = None

    def describe(self, world: int) -> str:
        where = "this host" if self.host == socket.gethostname() else f"host {self.host}"
        return f"rank {self.rank} of {world} (pid {self.pid} on {where})"


class Heartbeat:
    """This rank's heartbeat, and the watch over the other ranks of its host.

    ``timeout_s`` is how long a local rank's counter may stand still before it is ended;
    the job keeps it equal to the collective timeout (:meth:`set_timeout`). ``stop()``
    marks this rank done, so that peers finishing later do not take its silence for a
    hang.
    """

    def __init__(self, store: dist.Store, rank: int, world: int, timeout_s: float) -> None:
        self.store = store
        self.rank = rank
        self.world = world
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._places: dict[int, RankPlace] = {}
        self.ended: list[RankPlace] = []
        """The ranks this heartbeat ended (their collectives then fail with a reset)."""
        self.place = RankPlace(rank, socket.gethostname(), os.getpid(), process_start(os.getpid()))
        store.set(_place_key(rank), json.dumps(dataclasses.asdict(self.place)))
        store.add(_beat_key(rank), 1)
        self._thread = threading.Thread(target=self._run, name="torchgraft-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def for_torchrun(cls, timeout_s: float) -> Heartbeat | None:
        """The heartbeat of this process as a rank of the default process group, in the
        store at ``MASTER_ADDR:MASTER_PORT`` (None when those are unset)."""
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return None
        return cls(_job_store(), dist.get_rank(), dist.get_world_size(), timeout_s)

    def set_timeout(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def stop(self) -> None:
        """Mark this rank done and stop beating."""
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(*_STORE_ERRORS):
            self.store.set(_done_key(self.rank), "1")

    def _run(self) -> None:
        last_moved: dict[int, tuple[int, float]] = {}  # rank: (counter, when it last moved)
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.add(_beat_key(self.rank), 1)
                for peer in self._local_peers():
                    count = self.store.add(_beat_key(peer.rank), 0)
                    seen, since = last_moved.get(peer.rank, (-1, time.monotonic()))
                    if count != seen:
                        last_moved[peer.rank] = (count, time.monotonic())
                    elif time.monotonic() - since >= max(self.timeout_s, MIN_STALE_S):
                        self._end(peer, time.monotonic() - since)
            except _STORE_ERRORS:
                continue  # the store is out of reach: nothing can be judged this beat

    def _local_peers(self) -> list[RankPlace]:
        """The other ranks on this host that have not finished (torchrun numbers the ranks
        of a host contiguously from ``rank - LOCAL_RANK``)."""
        first = self.rank - int(os.environ.get("LOCAL_RANK", 0))
        count = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        peers = []
        for rank in range(first, first + count):
            if rank == self.rank or self.store.check([_done_key(rank)]):
                continue
            if rank not in self._places:  # registered once, read once
                place = _place(self.store, rank)
                if place is None:
                    continue
                self._places[rank] = place
            if self._places[rank].host == self.place.host:
                peers.append(self._places[rank])
        return peers

    def _end(self, peer: RankPlace, silent_s: float) -> None:
        """End a frozen local rank: the first rank to see it says so, and kills it if its
        process is still the one that registered (a dead rank's pid may be reused)."""
        me = str(self.rank).encode()
        if peer in self.ended or self.store.compare_set(_ended_key(peer.rank), "", me) != me:
            return  # ended already, by this rank or another
        alive = peer.started is not None and process_start(peer.pid) == peer.started
        action = "ending it with SIGKILL, which ends the job" if alive else "it has exited"
        print(
            f"torchgraft run: error: rank {self.rank} of {self.world}: "
            f"{peer.describe(self.world)} has not responded for {silent_s:.0f} s (stopped, "
            f"stuck or dead); {action}",
            file=sys.stderr,
            flush=True,
        )
        if alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(peer.pid, signal.SIGKILL)
        self.ended.append(peer)


def unresponsive_ranks(window_s: float = 2.5 * HEARTBEAT_S) -> list[RankPlace]:
    """The ranks of the default process group whose heartbeat stands still over
    ``window_s`` (ranks that finished excluded); empty when the heartbeats cannot be read."""
    if not dist.is_initialized() or "MASTER_ADDR" not in os.environ:
        return []
    try:
        store = _job_store()
        ranks = [r for r in range(dist.get_world_size()) if not store.check([_done_key(r)])]
        before = {r: store.add(_beat_key(r), 0) for r in ranks}
        time.sleep(window_s)
        stopped = [r for r in ranks if store.add(_beat_key(r), 0) == before[r]]
        places = [_place(store, r) for r in stopped]
    except _STORE_ERRORS:
        return []
    return [p if p is not None else RankPlace(r, "?", -1) for r, p in zip(stopped, places)]


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (field 22 of ``/proc/PID/stat``), or ``None`` if it is
    gone or there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the name start at 3


def _job_store() -> dist.Store:
    """A client connection of its own to the job's store (under torchrun: the agent's), so
    that a store call of the main thread never delays a beat; keys are per restart."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=_STORE_TIMEOUT,
        wait_for_workers=False,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"torchgraft/liveness/{attempt}/", store)


def _place(store: dist.Store, rank: int) -> RankPlace | None:
    if not store.check([_place_key(rank)]):
        return None
    return RankPlace(**json.loads(store.get(_place_key(rank))))


def _beat_key(rank: int) -> str:
    return f"beat/{rank}"


def _place_key(rank: int) -> str:
    return f"place/{rank}"


def _done_key(rank: int) -> str:
    return f"done/{rank}"


def _ended_key(rank: int) -> str:
    return f"ended/{rank}"
