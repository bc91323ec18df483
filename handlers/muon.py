"""``muon``: the Muon optimizer (:mod:`torchgraft.ops.muon`) for the 2-D hidden weights.

Claims every 2-D parameter matched by ``params``, except those matched by ``exclude`` and
those whose structural role is in ``exclude_roles`` (by default the embeddings and the
output head, found by structure as ``skip_head`` finds the head, whatever their names:
:mod:`torchgraft.handlers.roles`); everything else — embeddings, head, norms, biases — keeps AdamW with
the training config's settings. It declares no rules: it changes how the model trains,
not its graph. The LR schedule scales Muon's ``lr`` like AdamW's.
"""

from __future__ import annotations

import dataclasses

import torchgraft as tg
from torchgraft.handlers.claims import OptimizerClaim
from torchgraft.handlers.roles import ROLES
from torchgraft.ops.muon import Muon

__all__ = ["MuonHandler"]


@tg.register_handler("muon")
class MuonHandler(tg.Handler):
    """Muon on the hidden weight matrices, AdamW on the rest."""

    @dataclasses.dataclass(kw_only=True)
    class Options:
        lr: float = 0.02
        """Peak LR of the Muon parameters (the update has RMS about 1/sqrt(cols): Muon's LRs
        are ~10-100x AdamW's)."""
        momentum: float = 0.95
        """Momentum coefficient."""
        nesterov: bool = True
        """Orthogonalize the Nesterov look-ahead ``g + momentum * buffer``."""
        ns_steps: int = 5
        """Newton–Schulz iterations per update."""
        weight_decay: float = 0.0
        """Decoupled weight decay of the Muon parameters."""
        params: list[str] = dataclasses.field(default_factory=lambda: ["*"])
        """Parameter FQN globs Muon may take (only 2-D ones are taken)."""
        exclude: list[str] = dataclasses.field(default_factory=list)
        """Parameter FQN globs left to AdamW besides ``exclude_roles``."""
        exclude_roles: list[str] = dataclasses.field(default_factory=lambda: list(ROLES))
        """Parameters left to AdamW by what they are, found by structure whatever their
        names (:mod:`torchgraft.handlers.roles`): ``"embedding"`` (the embedding tables)
        and ``"head"`` (the projection producing the logits, as ``skip_head`` finds it)."""

        def validate(self) -> None:
            if self.lr < 0 or not 0.0 <= self.momentum < 1.0 or self.ns_steps < 1:
                raise ValueError("muon needs lr >= 0, 0 <= momentum < 1 and ns_steps >= 1")
            unknown = sorted(set(self.exclude_roles) - set(ROLES))
            if unknown:
                raise ValueError(f"muon exclude_roles {unknown} unknown; roles are {list(ROLES)}")

    def optimizer_claims(self) -> list[OptimizerClaim]:
        o = self.options
        options = dict(
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            ns_steps=o.ns_steps,
            weight_decay=o.weight_decay,
        )
        claim = OptimizerClaim(
            tuple(o.params), Muon, options, tuple(o.exclude), 2, tuple(o.exclude_roles)
        )
        return [claim]
