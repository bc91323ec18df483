"""Muon: momentum SGD whose update is orthogonalized by a Newton–Schulz iteration.

From K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024):
for a weight matrix with gradient ``G``, keep the momentum ``M ← μM + G``, take the
Nesterov look-ahead ``U = G + μM``, replace it by the nearest semi-orthogonal matrix
``O ≈ U (UᵀU)^(-1/2)`` (its singular values pushed to about 1 by five steps of a quintic
Newton–Schulz iteration), and step ``W ← W − lr · sqrt(max(1, rows / cols)) · O``.
It is meant for the 2-D hidden weights; embeddings, the output head, norms and biases
keep AdamW (:mod:`torchgraft.handlers.muon` sets that up).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""``(a, b, c)`` of the quintic ``X ← aX + b(XXᵀ)X + c(XXᵀ)²X``: tuned in the Muon write-up
to raise small singular values fast (they end in about [0.7, 1.2], not exactly 1)."""


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with the singular vectors of ``g``
    (``U Vᵀ`` of its SVD), computed in float32 by ``steps`` quintic Newton–Schulz steps."""
    if g.ndim != 2:
        raise ValueError(f"newton_schulz orthogonalizes matrices; got shape {list(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the basin
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (raises on others). State per parameter: ``step`` and
    ``momentum_buffer``; decoupled weight decay ``W ← W(1 − lr·wd)`` like AdamW."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or not 0.0 <= momentum < 1.0 or ns_steps < 1 or weight_decay < 0:
            raise ValueError(
                f"Muon needs lr >= 0, 0 <= momentum < 1, ns_steps >= 1, weight_decay >= 0; got "
                f"lr={lr}, momentum={momentum}, ns_steps={ns_steps}, weight_decay={weight_decay}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon updates 2-D weight matrices only; got a parameter of shape "
                        f"{list(p.shape)}: leave it to AdamW"
                    )
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["momentum_buffer"] = torch.zeros_like(p)
                grad, buf = p.grad, state["momentum_buffer"]
                buf.mul_(mu).add_(grad)
                update = grad.add(buf, alpha=mu) if group["nesterov"] else buf
                orthogonal = newton_schulz(update, group["ns_steps"])
                p.mul_(1.0 - lr * group["weight_decay"])
                p.add_(orthogonal, alpha=-lr * max(1.0, p.size(0) / p.size(1)) ** 0.5)
                state["step"] += 1
        return loss
