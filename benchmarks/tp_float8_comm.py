"""Bytes communicated per training step by tensor parallelism: float8 vs float32.

Runs the Llama (default: the ``debug`` preset, dim 256, 6 layers, vocab 2048) with its loss
in the graph, tensor-parallel over 2 ranks (gloo on CPU, sequence parallel, the default
plan), once unconverted and once with the ``float8`` handler (tensorwise; ``output`` stays
in float32), and counts every collective of one forward + backward step (after a warm-up
step) with a ``CommDebugMode`` that also sums bytes.

Bytes are each collective's per-rank input: the local shard an all-gather contributes, the
full tensor a reduce-scatter or all-reduce reduces. The float8 run all-gathers the inputs
of its float8 linears as e4m3 (1 byte instead of 4); reductions stay in float32.

    python benchmarks/tp_float8_comm.py [--preset debug] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor.debug import CommDebugMode

import torchgraft as tg
from torchgraft.models import build_llama
from torchgraft.passes.parallelize import parallelize

_functional = torch.ops._c10d_functional
_COLLECTIVES = {
    _functional.all_gather_into_tensor: "all_gather",
    _functional.reduce_scatter_tensor: "reduce_scatter",
    _functional.all_reduce: "all_reduce",
}
"""The collectives DTensor issues, by op packet; each one's input is its first argument."""


class CommBytes(CommDebugMode):
    """``CommDebugMode`` that also sums each collective's input bytes, by
    ``(phase, collective)`` with phase ``"forward"`` or ``"backward"``."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: tuple, args: tuple = (), kwargs: Any = None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = _COLLECTIVES.get(getattr(func, "_overloadpacket", None))
        if out is not NotImplemented and name is not None:
            phase = "backward" if self.advanced_module_tracker.is_bw else "forward"
            self.bytes[phase, name] += args[0].numel() * args[0].element_size()
        return out


def measure(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tokens = torch.randint(0, 256, (args.batch, args.seq_len), generator=torch.Generator())
    labels = torch.roll(tokens, -1, dims=1)
    results = {}
    for name, handlers in (("float32", []), ("float8", ["float8"])):
        gm = tg.capture(build_llama(args.preset, with_loss=True), (tokens, labels))
        if handlers:
            tg.PassManager(handlers).run(gm)
        gm = parallelize(gm, {"tp": 2})
        gm(tokens, labels).backward()  # warm-up
        with CommBytes() as comm:
            gm(tokens, labels).backward()
        results[name] = dict(comm.bytes)
    if rank == 0:
        torch.save(results, Path(out) / "bytes.pt")
    dist.destroy_process_group()


def report(results: dict[str, dict[tuple[str, str], int]]) -> str:
    keys = sorted({key for counts in results.values() for key in counts})
    lines = [f"{'phase':<9} {'collective':<15} {'float32 KiB':>12} {'float8 KiB':>12} {'ratio':>6}"]
    for key in [*keys, ("total", "")]:
        if key[0] == "total":
            fp32, fp8 = (sum(results[n].values()) for n in ("float32", "float8"))
        else:
            fp32, fp8 = (results[n].get(key, 0) for n in ("float32", "float8"))
        ratio = f"{fp8 / fp32:6.3f}" if fp32 else "     -"
        lines.append(f"{key[0]:<9} {key[1]:<15} {fp32 / 1024:12.1f} {fp8 / 1024:12.1f} {ratio}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="debug", help="Llama preset (debug or tiny)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(measure, args=(args, port, out), nprocs=2, join=True)
        results = torch.load(Path(out) / "bytes.pt")
    print(
        f"Llama {args.preset}, batch {args.batch} x {args.seq_len} tokens, tensor parallel "
        "over 2 ranks (sequence parallel), one training step, per-rank collective input bytes:"
    )
    print(report(results))


if __name__ == "__main__":
    main()
