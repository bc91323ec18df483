"""Joint stage: peak memory and step time of ``selective_recompute`` vs the unconverted step.

Forward + backward of the ``debug`` Llama with its loss (dim 256, 6 layers, vocab 2048),
batch 4 x 128, three ways: the captured graph run eagerly (autograd saves what each op's
formula asks for), the joint graph partitioned by the min-cut partitioner with no joint
handler, and with ``selective_recompute`` (save matmul and attention outputs, recompute
everything else). Peak = live CPU bytes allocated during the step (profiler allocation
events, :func:`torchgraft.tools.memory.measure`), so parameters are not counted and their
gradients are; time = median of ``--repeat`` unprofiled steps. Gradients are checked
against the eager step.

Measured on the project's 2-core CPU machine, nearly idle (load average 1.4), ``--repeat 5``::

    step                    peak MiB       ms  grads SQNR dB
    eager (unconverted)         76.7    123.3  inf
    joint, min-cut only         76.9    118.3  inf
    selective_recompute         60.2    125.1  inf

    python benchmarks/joint_recompute.py [--repeat 5] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

import torchgraft as tg
from torchgraft.models import build_llama
from torchgraft.ops.numerics import sqnr
from torchgraft.passes.joint import JointModule
from torchgraft.passes.report import Report
from torchgraft.tools.memory import measure


def step(module, model, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    module(*inputs).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    model = build_llama("debug", with_loss=True, seed=0)
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(
        torch.randint(0, 256, (args.batch, args.seq), generator=generator) for _ in range(2)
    )
    gm = tg.capture(model, inputs)
    report = tg.PassManager([]).run(gm)
    ways = {
        "eager (unconverted)": gm,
        "joint, min-cut only": JointModule(gm, lambda joint: Report(order=[]), [], report),
        "selective_recompute": tg.PassManager(["selective_recompute"]).joint_module(gm),
    }
    reference = None
    print(f"{'step':22} {'peak MiB':>9} {'ms':>8}  grads SQNR dB")
    for name, module in ways.items():
        step(module, model, inputs)  # trace / warm up
        grads, memory = measure(functools.partial(step, module, model, inputs))
        grads = {n: g.clone() for n, g in grads.items()}
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            step(module, model, inputs)
            times.append(time.perf_counter() - start)
        reference = reference or grads
        worst = min(sqnr(grads[n], reference[n]) for n in grads if reference[n].norm() > 0)
        print(
            f"{name:22} {memory.peak / 2**20:9.1f} {1e3 * statistics.median(times):8.1f}  {worst:.1f}"
        )


if __name__ == "__main__":
    main()
