"""The heartbeat watch over a host's ranks, on a real TCPStore and real processes: a rank
whose counter stops is named and ended; a rank that finished is left alone."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import torch.distributed as dist

from torchgraft.passes import liveness


def _silent_rank(store: dist.Store, rank: int) -> subprocess.Popen:
    """A real process registered as ``rank`` whose heartbeat never moves."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    place = {"rank": rank, "host": socket.gethostname(), "pid": process.pid}
    store.set(f"place/{rank}", json.dumps(place))
    store.add(f"beat/{rank}", 1)
    return process


def test_a_silent_rank_of_this_host_is_named_and_ended_and_a_finished_one_is_not(
    monkeypatch, capsys
):
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    store = dist.PrefixStore("job/", server)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    silent, finished = _silent_rank(store, 1), _silent_rank(store, 2)
    store.set("done/2", "1")
    heartbeat = liveness.Heartbeat(store, rank=0, world=3, timeout_s=0.0)
    try:
        silent.wait(timeout=liveness.MIN_STALE_S + 10 * liveness.HEARTBEAT_S)
        assert finished.poll() is None  # as silent, but done: not taken for a hang
        assert [p.rank for p in heartbeat.ended] == [1]
        assert store.get("ended/1") == b"0"  # rank 0 claimed it: no other rank repeats it
        beats = store.add("beat/0", 0)
        time.sleep(2.5 * liveness.HEARTBEAT_S)
        assert store.add("beat/0", 0) > beats  # this rank keeps beating
    finally:
        heartbeat.stop()
        for process in (silent, finished):
            process.kill()
            process.wait()
    assert store.check(["done/0"])
    error = capsys.readouterr().err
    assert f"rank 0 of 3: rank 1 of 3 (pid {silent.pid} on this host) has not responded" in error
    assert "rank 2" not in error
