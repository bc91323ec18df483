"""Peak memory of the loss: the unchunked graph vs ``chunked_cross_entropy``.

Forward + backward of two captured graphs, before and after the ``chunked_cross_entropy``
handler, on the same random inputs:

  * ``head``: the output projection and the loss alone (``h [B, L, D]`` → ``linear`` →
    ``flatten`` → ``cross_entropy``), where the ``[B·L, V]`` logits dominate;
  * ``llama``: the ``debug`` Llama (vocab and sequence length raised to the shape below) with
    its loss in the graph (``build_llama(..., with_loss=True)``).

``torch.cuda.max_memory_allocated`` has no CPU counterpart, so the profiler's allocation
events (``profile_memory=True``) are replayed in time order: the running sum of the bytes
allocated and freed inside the measured call peaks at the memory that call added
(parameters and inputs, allocated before, are not counted; their gradients are). Also
reported: the largest single allocation (the full logits, unchunked) and the wall time
(profiled, on a shared machine: indicative only). The chunked graphs' losses and gradients
are checked equal to the unchunked graph's.

Measured on 2 CPU cores (torch 2.13), defaults (8x1024 tokens, V=32000, D=256)::

    graph      loss        chunk   peak MiB  largest MiB
    head       unchunked       -       3000         1000
    head       chunked      1024        165          125   (18.1x less)
    head       chunked       256         71           31   (42.4x less)
    llama 2L   unchunked       -       3361         1000
    llama 2L   chunked      1024        526          125   (6.4x less)
    llama 2L   chunked       256        432           31   (7.8x less)

    python benchmarks/chunked_ce_memory.py [--batch 8] [--seq 1024] [--vocab 32000]
        [--dim 256] [--chunk-sizes 1024 256] [--layers 2] [--skip-llama]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import torchgraft as tg
from torchgraft.models import build_llama
from torchgraft.tools.memory import measure

MiB = 2**20


class Head(nn.Module):
    """Output projection + mean cross-entropy, written like the built-in Llama's loss."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.output(h).flatten(0, 1), labels.flatten(0, 1))


def fwd_bwd(gm, model: nn.Module, inputs: tuple):
    """Forward + backward from cleared gradients (cleared before the measured call, so
    freeing old gradients does not offset it); returns the loss and the gradients."""
    params = list(model.parameters())
    leaves = [t for t in inputs if t.is_floating_point()]
    for t in params + leaves:
        t.grad = None

    def run():
        loss = gm(*inputs)
        loss.backward()
        return loss.detach(), [t.grad for t in params + leaves]

    return run


def compare(name: str, model: nn.Module, inputs: tuple, chunk_sizes: list[int]) -> list[tuple]:
    gm = tg.capture(model, inputs)
    fwd_bwd(gm, model, inputs)()  # warm-up: allocator, lazy initialization
    (ref_loss, ref_grads), ref = measure(fwd_bwd(gm, model, inputs))
    rows = [(name, "unchunked", "-", ref, 1.0)]
    for chunk in chunk_sizes:
        chunked = tg.capture(model, inputs)
        tg.PassManager([{"chunked_cross_entropy": {"chunk_size": chunk}}]).run(chunked)
        (loss, grads), result = measure(fwd_bwd(chunked, model, inputs))
        torch.testing.assert_close(loss, ref_loss)
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
        rows.append((name, "chunked", str(chunk), result, ref.peak / result.peak))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--layers", type=int, default=2, help="layers of the llama graph")
    parser.add_argument("--skip-llama", action="store_true")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    torch.manual_seed(0)
    h = torch.randn(args.batch, args.seq, args.dim, generator=gen).requires_grad_()
    shape = f"{args.batch}x{args.seq} tokens, V={args.vocab}, D={args.dim}"
    rows = compare("head", Head(args.dim, args.vocab), (h, labels), args.chunk_sizes)
    if not args.skip_llama:
        llama = build_llama(
            "debug",
            with_loss=True,
            vocab_size=args.vocab,
            dim=args.dim,
            n_layers=args.layers,
            max_seq_len=args.seq,
        )
        name = f"llama {args.layers}L"
        rows += compare(name, llama, (tokens, labels), args.chunk_sizes)

    logits = args.batch * args.seq * args.vocab * 4 / MiB
    print(f"forward + backward, {shape}; full float32 logits = {logits:.0f} MiB\n")
    header = ("graph", "loss", "chunk", "peak MiB", "largest MiB", "time s", "peak ratio")
    print("{:<10} {:<10} {:>6} {:>10} {:>12} {:>7} {:>11}".format(*header))
    for name, variant, chunk, m, ratio in rows:
        print(
            f"{name:<10} {variant:<10} {chunk:>6} {m.peak / MiB:>10.0f} {m.largest / MiB:>12.0f} "
            f"{m.seconds:>7.2f} {ratio:>10.1f}x"
        )


if __name__ == "__main__":
    main()
