"""Muon (``muon`` handler) vs AdamW on the default model at equal steps.

The ``debug`` Llama with its loss (dim 256, 6 layers, vocab 2048), captured with
``torch.export``, trained on the built-in corpus with the default config's settings
(batch 4 x 128, lr 3e-3, warmup 8, cosine to 0.1x): once with AdamW everywhere, once with
the ``muon`` handler (Muon at lr 0.02 on the 2-D hidden weights, AdamW with the same
settings on embeddings, head and norms). Same seed, same batches. Prints both loss curves
(every ``--every`` steps) and the mean loss of the last 10 steps.

Measured with the defaults (80 steps, every 10)::

    step    adamw     muon
       0   8.0830   8.0830
      10   3.2764   3.2642
      20   2.7991   2.5919
      30   2.5946   2.4586
      40   2.5377   2.3765
      50   2.4516   2.3127
      60   2.4663   2.3283
      70   2.3852   2.2239
      79   2.3731   2.1877
    adamw: mean loss of the last 10 steps 2.3815
    muon: mean loss of the last 10 steps 2.2002

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
