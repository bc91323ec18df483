"""Muon (``muon`` handler) vs AdamW on the default model at equal steps.

The ``debug`` Llama with its loss (dim 256, 6 layers, vocab 2048), captured with
``torch.export``, trained on the built-in corpus with the default config's settings
(batch 4 x 128, lr 3e-3, warmup 8, cosine to 0.1x): once with AdamW everywhere, once with
the ``muon`` handler (Muon at lr 0.02 on the 2-D hidden weights, AdamW with the same
settings on embeddings, head and norms). Same seed, same batches. Prints both loss curves
(every ``--every`` steps) and the mean loss of the last 10 steps.

Measured on the shared 2-core CPU machine, ``--steps 30 --every 5``::

    step    adamw     muon
       0   8.0830   8.0830
       5   3.8910   4.5727
      10   3.2760   3.2631
      15   2.9546   2.7999
      20   2.8292   2.5836
      25   2.6193   2.4305
      29   2.6520   2.4093
    adamw: mean loss of the last 10 steps 2.7438
    muon: mean loss of the last 10 steps 2.5112

    python benchmarks/muon_vs_adamw.py [--steps 80] [--every 10] [--muon-lr 0.02]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import torchgraft as tg
from torchgraft.models import build_llama
from torchgraft.train import TrainConfig, train


def run(plan: list, config: TrainConfig) -> list[float]:
    model = build_llama("debug", with_loss=True, seed=0)
    tokens = torch.zeros(config.batch_size, config.seq_len, dtype=torch.long)
    gm = tg.capture(model, (tokens, tokens.clone()))
    pm = tg.PassManager(plan)
    pm.run(gm)
    return train(gm, config, pm.handlers).losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--muon-lr", type=float, default=0.02)
    args = parser.parse_args()
    config = TrainConfig(
        steps=args.steps, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=8, progress=False
    )
    curves = {
        "adamw": run([], config),
        "muon": run([{"muon": {"lr": args.muon_lr}}], config),
    }
    print("step  " + "  ".join(f"{name:>7}" for name in curves))
    for step in [*range(0, args.steps, args.every), args.steps - 1]:
        print(f"{step:4d}  " + "  ".join(f"{c[step]:7.4f}" for c in curves.values()))
    for name, losses in curves.items():
        print(f"{name}: mean loss of the last 10 steps {statistics.fmean(losses[-10:]):.4f}")


if __name__ == "__main__":
    main()
