"""The heartbeat watch over a host's ranks, on a real TCPStore and real processes: a rank
whose counter stops is named and ended; one that finished, or whose process is gone, is not
killed."""

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
    started = liveness.process_start(process.pid)
    place = {"rank": rank, "host": socket.gethostname(), "pid": process.pid, "started": started}
    store.set(f"place/{rank}", json.dumps(place))
    store.add(f"beat/{rank}", 1)
    return process


def test_a_silent_rank_of_this_host_is_named_and_ended_and_a_finished_one_is_not(
    monkeypatch, capsys
):
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    store = dist.PrefixStore("job/", server)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    silent, finished, exited = (_silent_rank(store, rank) for rank in (1, 2, 3))
    store.set("done/2", "1")
    exited.kill()  # rank 3 died: its pid may go to another process, which must not be hit
    exited.wait()
    heartbeat = liveness.Heartbeat(store, rank=0, world=4, timeout_s=0.0)
    try:
        silent.wait(timeout=liveness.MIN_STALE_S + 10 * liveness.HEARTBEAT_S)
        assert finished.poll() is None  # as silent, but done: not taken for a hang
        deadline = time.monotonic() + 5 * liveness.HEARTBEAT_S
        while len(heartbeat.ended) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(p.rank for p in heartbeat.ended) == [1, 3]
        assert store.get("ended/1") == b"0"  # rank 0 claimed it: no other rank repeats it
        beats = store.add("beat/0", 0)
        time.sleep(2.5 * liveness.HEARTBEAT_S)
        assert store.add("beat/0", 0) > beats  # this rank keeps beating
    finally:
        heartbeat.stop()
        for process in (silent, finished, exited):
            process.kill()
            process.wait()
    assert store.check(["done/0"])
    error = capsys.readouterr().err
    assert f"rank 0 of 4: rank 1 of 4 (pid {silent.pid} on this host) has not responded" in error
    assert f"rank 3 of 4 (pid {exited.pid} on this host) has not responded" in error
    assert error.count("ending it with SIGKILL") == 1 and error.count("it has exited") == 1
    assert "rank 2" not in error
