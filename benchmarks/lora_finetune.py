"""Module stage: a ``lora`` fine-tuning step against full fine-tuning of the same model.

The ``debug`` Llama with its loss (dim 256, 6 layers, vocab 2048), batch 4 x 128, captured
and trained with AdamW two ways: every parameter trained, and with the ``lora`` handler on
every linear of the transformer blocks (rank 8, base frozen; embeddings, norms and head
keep training, as the handler leaves them). Printed per way: trainable parameters, AdamW
state after one step, the peak of live CPU bytes allocated during one step (forward,
backward, optimizer; :func:`torchgraft.tools.memory.measure`, so what existed before the
step is not counted) and the median step time over ``--repeat`` interleaved rounds; then
each ratio, LoRA over full. The loss of the LoRA model before training equals the full
model's (``B`` starts at zero), which the script checks.

    python benchmarks/lora_finetune.py [--repeat 10] [--rank 8]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import fx

import torchgraft as tg
from torchgraft.models import build_llama
from torchgraft.tools.memory import measure

TARGETS = ["*.attention.w?", "*.feed_forward.w?"]


def prepared(lora_rank: int | None, inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """The captured debug Llama, with ``lora`` on the block linears when ``lora_rank``."""
    model = build_llama("debug", with_loss=True, seed=0)
    if lora_rank is not None:
        tg.PassManager([{"lora": {"targets": TARGETS, "rank": lora_rank}}]).convert_module(model)
    return tg.capture(model, inputs)


def training_step(
    gm: fx.GraphModule, optimizer: torch.optim.Optimizer, inputs: tuple[torch.Tensor, ...]
) -> float:
    """One AdamW step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = gm(*inputs)
    loss.backward()
    optimizer.step()
    return loss.item()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randint(0, 2048, (4, 128), generator=generator) for _ in range(2))
    ways = {"full fine-tuning": prepared(None, inputs), "lora": prepared(args.rank, inputs)}
    with torch.no_grad():
        initial = {name: gm(*inputs).item() for name, gm in ways.items()}
    if initial["lora"] != initial["full fine-tuning"]:
        raise SystemExit(f"lora changed the initial loss: {initial}")
    optimizers = {
        name: torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-3)
        for name, gm in ways.items()
    }
    steps: dict[str, Callable[[], float]] = {
        name: functools.partial(training_step, gm, optimizers[name], inputs)
        for name, gm in ways.items()
    }
    rows = {}
    for name, step in steps.items():
        step()  # warm up; creates the optimizer state
        _, memory = measure(step)
        trainable = sum(p.numel() for p in ways[name].parameters() if p.requires_grad)
        rows[name] = [trainable, state_bytes(optimizers[name]) / 2**20, memory.peak / 2**20]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeat):  # interleaved: both ways see the same machine load
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    for name in steps:
        rows[name].append(1e3 * statistics.median(times[name]))
    header = ["trainable params", "AdamW state MiB", "step peak MiB", "step ms"]
    print(f"{'':18}" + "".join(f"{h:>18}" for h in header))
    for name, row in rows.items():
        print(f"{name:18}" + "".join(f"{v:>18,.1f}" for v in row))
    ratios = [lo / full for lo, full in zip(rows["lora"], rows["full fine-tuning"], strict=True)]
    print(f"{'lora / full':18}" + "".join(f"{r:>17.3f}x" for r in ratios))
    print(f"initial loss (both): {initial['lora']:.4f}")


if __name__ == "__main__":
    main()
