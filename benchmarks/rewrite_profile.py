"""Where torchgraft's rewrite time goes: the plan of ``rewrite_scaling.py`` on one graph size,
sampled by a CPU-time profiler, ``recompile()`` excluded.

A ``SIGPROF`` timer interrupts the process every millisecond of its CPU time during the
runs; each sample is charged to the innermost frame on its stack that names a part of the
engine (see ``PARTS``), so a part's share includes the fx and fake-tensor calls made from
it. Unlike ``cProfile`` this does not inflate the cost of small Python functions.

    python benchmarks/rewrite_profile.py [--layers 96] [--runs 40]
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import os
import signal
import time
from types import FrameType

from rewrite_scaling import BenchPlan, build_graph

import torchgraft as tg

PARTS: list[tuple[str, str]] = [
    ("replacement traces", "replacement.py:trace_replacement"),
    ("template keys", "replacement.py:signature"),
    ("output shape checks", "rewriter.py:_check_outputs"),
    ("node insertion", "rewriter.py:insert_copy"),
    ("moving uses", "rewriter.py:replace_uses"),
    ("splice, rest", "rewriter.py:_splice"),
    ("matching", "matcher.py:find_matches"),
    ("commit: erasing", "node_edit.py:erase_nodes"),
    ("commit: checking edits", "rewriter.py:check"),
    ("commit, rest", "rewriter.py:commit"),
    ("records and dispatch", "rewriter.py:_apply_one"),
    ("records and dispatch", "rewriter.py:apply"),
    ("pass manager", "manager.py:run"),
]
"""(part, ``file:function``): a sample counts for the innermost frame of its stack that is
one of these functions."""


class Sampler:
    """Counts SIGPROF samples per part while :attr:`active`."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.active = False
        self._parts = {function: part for part, function in PARTS}

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.active:
            return
        while frame is not None:
            code = frame.f_code
            part = self._parts.get(f"{os.path.basename(code.co_filename)}:{code.co_name}")
            if part is not None:
                self.counts[part] += 1
                return
            frame = frame.f_back
        self.counts["elsewhere"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=96)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    gm, _ = build_graph(args.layers)
    sampler = Sampler()
    signal.signal(signal.SIGPROF, sampler)
    signal.setitimer(signal.ITIMER_PROF, 0.001, 0.001)
    times = []
    for _ in range(args.runs):
        work = copy.deepcopy(gm)
        work.recompile = lambda: None  # the rewriting alone
        gc.collect()
        gc.disable()
        sampler.active = True
        start = time.process_time()
        tg.PassManager([BenchPlan]).run(work)
        times.append(time.process_time() - start)
        sampler.active = False
        gc.enable()
    signal.setitimer(signal.ITIMER_PROF, 0, 0)
    mean, total = sum(times) / len(times), sum(sampler.counts.values())
    print(
        f"{len(gm.graph.nodes)} nodes: rewriting {1e3 * mean:.1f} ms mean, "
        f"{1e3 * min(times):.1f} ms min of {args.runs} runs (CPU time); {total} samples; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for part, count in sampler.counts.most_common():
        print(f"  {part:24s} {100 * count / total:5.1f}%  {1e3 * mean * count / total:6.1f} ms")


if __name__ == "__main__":
    main()
