"""CPU memory of a piece of work, from the profiler's allocation events."""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from typing import Any

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


@dataclasses.dataclass
class Measurement:
    """What :func:`measure` saw while ``fn`` ran."""

    peak: int
    """Peak of live CPU bytes allocated inside it (allocations minus frees, in time order)."""
    largest: int
    """Its largest single allocation, in bytes."""
    seconds: float
    """Wall time (inflated by the profiler)."""


def measure(fn: Callable[[], Any]) -> tuple[Any, Measurement]:
    """Run ``fn()`` under the memory profiler; return its result and a :class:`Measurement`."""
    gc.collect()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    seconds = time.perf_counter() - start
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        event = todo.pop()
        todo.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return result, Measurement(peak, max((size for _, size in events), default=0), seconds)
