"""Rewrite cost vs graph size: torchgraft vs ``torch.fx.subgraph_rewriter.replace_pattern``.

Exported Llama-style graphs from ~1k to ~20k nodes; the same three rewrites done both ways
in the same process on identical copies of each graph:

  1. bias-free ``aten.linear``      → ``torchgraft_bench::linear`` (a custom op)
  2. ``aten.silu``                  → ``x * sigmoid(x)``
  3. six-op RMSNorm                 → ``torchgraft::rms_norm`` (fused custom op)

torchgraft applies them as one plan (one ``recompile()``); ``replace_pattern`` needs three
calls, each recompiling. Both rewritten graphs are run on the same tokens and their outputs
checked equal. Reported: µs per graph node end to end and for the rewriting alone
(end to end minus the time spent inside ``recompile()``, which is timed as it runs), each
the best of ``--repeat`` runs per method (the two methods' runs interleaved), and
torchgraft's speed-up ratios: best against best, and "paired", the median over rounds of
the two methods' ratio within a round (steadier where the machine's speed drifts). Times
are this process's CPU time (``time.process_time``; the work is single-threaded), so other
processes on a shared machine do not inflate them.

    python benchmarks/rewrite_scaling.py [--layers 14 48 96 190 290] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import time

import torch
from torch.fx.subgraph_rewriter import replace_pattern

import torchgraft as tg
import torchgraft.ops.norm  # noqa: F401  (registers torchgraft::rms_norm)
from torchgraft.models import build_llama

aten = torch.ops.aten
EPS = 1e-5


@torch.library.custom_op("torchgraft_bench::linear", mutates_args=())
def bench_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w)


@bench_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


# The patterns and replacements, shared by both rewriters.
def linear_pattern(x, w):
    return aten.linear.default(x, w)


def linear_replacement(x, w):
    return torch.ops.torchgraft_bench.linear.default(x, w)


def silu_pattern(x):
    return aten.silu.default(x)


def silu_replacement(x):
    return aten.mul.Tensor(x, aten.sigmoid.default(x))


def rms_pattern(x, w):
    mean = aten.mean.dim(aten.pow.Tensor_Scalar(x, 2), [-1], True)
    return aten.mul.Tensor(aten.mul.Tensor(x, aten.rsqrt.default(aten.add.Tensor(mean, EPS))), w)


def rms_replacement(x, w):
    return torch.ops.torchgraft.rms_norm.default(x, w, EPS)


class BenchPlan(tg.Handler):
    linear = tg.rule(linear_pattern)
    linear.replacement(linear_replacement)
    silu = tg.rule(silu_pattern)
    silu.replacement(silu_replacement)
    rms = tg.rule(rms_pattern)
    rms.replacement(rms_replacement)


def build_graph(layers: int):
    model = build_llama(
        "tiny", n_layers=layers, dim=32, n_heads=2, vocab_size=64, hidden_dim=64, norm_eps=EPS
    )
    tokens = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    return tg.capture(model, (tokens,)), tokens


@contextlib.contextmanager
def no_gc():
    """Time without the cyclic collector: a collection triggered by one method's garbage
    must not be billed to the other."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def timing_recompiles(gm) -> list[float]:
    """Make ``gm.recompile()`` record its own duration in the returned list."""
    spent: list[float] = []
    recompile = gm.recompile

    def timed_recompile():
        start = time.process_time()
        result = recompile()
        spent.append(time.process_time() - start)
        return result

    gm.recompile = timed_recompile
    return spent


def time_torchgraft(gm) -> tuple[float, float, dict]:
    recompiles = timing_recompiles(gm)
    with no_gc():
        start = time.process_time()
        report = tg.PassManager([BenchPlan]).run(gm)
        total = time.process_time() - start
    return total, sum(recompiles), report.rule_matches["BenchPlan"]


def time_replace_pattern(gm) -> tuple[float, float, dict]:
    counts = {}
    recompiles = timing_recompiles(gm)
    with no_gc():
        start = time.process_time()
        for name, pattern, replacement in (
            ("linear", linear_pattern, linear_replacement),
            ("silu", silu_pattern, silu_replacement),
            ("rms", rms_pattern, rms_replacement),
        ):
            counts[name] = len(replace_pattern(gm, pattern, replacement))
        total = time.process_time() - start
    return total, sum(recompiles), counts


def best(runs: list[tuple[float, float, dict]]) -> tuple[float, float]:
    """The best (least) end-to-end time and, taken on its own, the best rewriting time
    (end to end minus the recompiles) of a method's runs: each is that quantity's best of N,
    the same rule for both methods."""
    return min(total for total, _, _ in runs), min(total - rc for total, rc, _ in runs)


def paired_ratios(tg_runs: list, fx_runs: list) -> tuple[float, float]:
    """Median over rounds of ``replace_pattern``'s time ÷ torchgraft's in the same round (end
    to end, rewriting alone). Each round runs the two back to back, so a machine that is
    slower for a while slows both: the ratio is steadier than the best-of ratio where the
    machine's speed drifts (shared virtual machines)."""
    end_to_end = [fx[0] / tg[0] for tg, fx in zip(tg_runs, fx_runs)]
    rewriting = [(fx[0] - fx[1]) / (tg[0] - tg[1]) for tg, fx in zip(tg_runs, fx_runs)]
    return statistics.median(end_to_end), statistics.median(rewriting)


def measure(layers: int, repeat: int) -> dict:
    gm, tokens = build_graph(layers)
    nodes = len(gm.graph.nodes)
    tg_runs, fx_runs = [], []
    for _ in range(repeat):
        ours, theirs = copy.deepcopy(gm), copy.deepcopy(gm)
        tg_runs.append(time_torchgraft(ours))
        fx_runs.append(time_replace_pattern(theirs))
    tg_counts, fx_counts = tg_runs[0][2], fx_runs[0][2]
    if tg_counts != fx_counts:
        raise SystemExit(
            f"match counts differ: torchgraft {tg_counts} vs replace_pattern {fx_counts}"
        )
    with torch.no_grad():
        if not torch.equal(ours(tokens), theirs(tokens)):
            raise SystemExit("rewritten graphs disagree on the same tokens")
    tg_total, tg_rewrite = best(tg_runs)
    fx_total, fx_rewrite = best(fx_runs)
    paired, paired_rewrite = paired_ratios(tg_runs, fx_runs)
    return {
        "layers": layers,
        "nodes": nodes,
        "matches": sum(tg_counts.values()),
        "tg_us": 1e6 * tg_total / nodes,
        "tg_rw_us": 1e6 * tg_rewrite / nodes,
        "fx_us": 1e6 * fx_total / nodes,
        "fx_rw_us": 1e6 * fx_rewrite / nodes,
        "tg_s": tg_total,
        "fx_s": fx_total,
        "paired": paired,
        "paired_rw": paired_rewrite,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[14, 48, 96, 190, 290])
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs per method")
    args = parser.parse_args()
    header = (
        f"{'nodes':>6} {'matches':>7} | {'torchgraft µs/node':>18} {'(rewrite)':>9} | "
        f"{'replace_pattern µs/node':>23} {'(rewrite)':>9} | {'speed-up':>8} {'(rewrite)':>9} | "
        f"{'paired':>7} {'(rewrite)':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for layers in args.layers:
        r = measure(layers, args.repeat)
        rows.append(r)
        print(
            f"{r['nodes']:>6} {r['matches']:>7} | {r['tg_us']:>18.1f} {r['tg_rw_us']:>9.1f} | "
            f"{r['fx_us']:>23.1f} {r['fx_rw_us']:>9.1f} | {r['fx_us'] / r['tg_us']:>7.1f}x "
            f"{r['fx_rw_us'] / r['tg_rw_us']:>8.1f}x | {r['paired']:>6.1f}x {r['paired_rw']:>8.1f}x",
            flush=True,
        )
    first, last = rows[0], rows[-1]
    print(
        f"\ntorchgraft µs/node at {last['nodes']} nodes / at {first['nodes']} nodes: "
        f"{last['tg_us'] / first['tg_us']:.2f} end to end, {last['tg_rw_us'] / first['tg_rw_us']:.2f} rewriting"
    )


if __name__ == "__main__":
    main()
