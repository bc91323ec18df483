"""Compile stage: step time of ``onednn_matmul`` vs the unconverted compiled step, and the
FX graph cache hit of a second compile.

Forward + backward of the ``debug`` Llama with its loss (dim 256, 6 layers, vocab 2048),
batch 4 x 128, float32 on CPU, compiled with ``torch.compile`` (Inductor) three ways in
one process: unconverted; with the ``onednn_matmul`` compile-stage handler (each float32
``aten.mm`` of the post-grad forward and backward graphs on oneDNN instead of MKL); and,
for reference, unconverted under torch's global switch
``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` (which on a CPU without AMX routes
float32 GEMMs to oneDNN without lowering their precision: check the SQNR column). Time =
min over ``--rounds`` interleaved rounds of ``--repeat`` steps each; gradients are compared
with the eager step. Wall time and process CPU time (min of each) are both shown: on a
machine shared with other jobs the CPU time is the steadier one. Then the converted step is compiled again after ``torch._dynamo.reset()``
with an unchanged plan (an FX graph cache hit) and with a changed one (a miss).

Measured on the shared 2-core AMD EPYC (Zen 4) machine, under load from other jobs,
``--rounds 4 --repeat 5 --threads 1`` (load average 4.4)::

    rewritten GEMMs: 129 (forward + backward graphs)
    step                          wall ms  ratio   CPU ms  ratio  grads SQNR dB
    compiled (unconverted)          220.7  1.00x    217.3  1.00x  118.8
    compiled + onednn_matmul        141.4  0.64x    135.5  0.62x  115.1
    unconverted, knob "bf16"        267.0  1.21x    262.0  1.21x  115.1

    FX graph cache (an empty cache directory, fresh Dynamo state each time):
      first compile                        first step   13.3 s  {'cache_hits': 0, 'cache_misses': 2}
      unchanged plan again                 first step    1.5 s  {'cache_hits': 2, 'cache_misses': 0}
      plan changed (wsd added)             first step   12.3 s  {'cache_hits': 0, 'cache_misses': 2}

With two threads at load 1.6-2.4: 0.66x (85 vs 129 ms, CPU time 0.66x); under heavier load
(5-7) 0.65x, 0.70x, 0.34x and once 1.22x (slower): see the README.

    python benchmarks/compile_onednn_matmul.py [--rounds 3] [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import torchgraft as tg
from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.models import build_llama
from torchgraft.ops.numerics import sqnr
from torchgraft.passes.compile_stage import cache_counts

_KNOB = torch.backends.mkldnn.matmul


def step(module, model, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    module(*inputs).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def compiled(gm, plan, report=None):
    """A fresh compile of a copy of ``gm`` (new code object: nothing reused by Dynamo)."""
    return tg.PassManager(plan).compile_module(copy_graph_module(gm), report)


def timed_compile(gm, model, inputs, plan) -> tuple[float, dict[str, int]]:
    """Seconds of the first (compiling) step after ``torch._dynamo.reset()``, and the
    FX graph cache counters it moved."""
    torch._dynamo.reset()
    before = cache_counts()
    module = compiled(gm, plan)
    start = time.perf_counter()
    step(module, model, inputs)
    seconds = time.perf_counter() - start
    return seconds, {k: v - before[k] for k, v in cache_counts().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tg-bench-inductor-")
    model = build_llama("debug", with_loss=True, seed=0)
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randint(0, 256, (4, 128), generator=generator) for _ in range(2))
    gm = tg.capture(model, inputs)
    reference = step(gm, model, inputs)

    report = tg.PassManager(["onednn_matmul"]).run(gm)
    ways = {
        "compiled (unconverted)": (compiled(gm, []), "none"),
        "compiled + onednn_matmul": (compiled(gm, ["onednn_matmul"], report), "none"),
        'unconverted, knob "bf16"': (compiled(gm, []), "bf16"),
    }
    quality = {}
    for name, (module, knob) in ways.items():
        _KNOB.fp32_precision = knob
        grads = step(module, model, inputs)  # compiles
        quality[name] = min(sqnr(grads[n], reference[n]) for n in grads if reference[n].norm() > 0)
    wall: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, (module, knob) in ways.items():
            _KNOB.fp32_precision = knob
            for _ in range(args.repeat):
                start, start_cpu = time.perf_counter(), time.process_time()
                step(module, model, inputs)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    _KNOB.fp32_precision = "none"
    base, base_cpu = min(wall["compiled (unconverted)"]), min(cpu["compiled (unconverted)"])
    print(f"rewritten GEMMs: {report.matches['onednn_matmul']} (forward + backward graphs)")
    print(f"threads: {torch.get_num_threads()}")
    print(f"{'step':28} {'wall ms':>8} {'ratio':>6} {'CPU ms':>8} {'ratio':>6}  grads SQNR dB")
    for name in ways:
        best, best_cpu = min(wall[name]), min(cpu[name])
        print(
            f"{name:28} {1e3 * best:8.1f} {best / base:5.2f}x {1e3 * best_cpu:8.1f} "
            f"{best_cpu / base_cpu:5.2f}x  {quality[name]:.1f}"
        )

    print("\nFX graph cache (an empty cache directory, fresh Dynamo state each time):")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tg-bench-inductor-")
    for label, plan in [
        ("first compile", ["onednn_matmul"]),
        ("unchanged plan again", ["onednn_matmul"]),
        ("plan changed (wsd added)", ["onednn_matmul", "wsd"]),
    ]:
        seconds, cache = timed_compile(gm, model, inputs, plan)
        print(f"  {label:36} first step {seconds:6.1f} s  {cache}")


if __name__ == "__main__":
    main()
