"""``selective_recompute``: selective activation recomputation by op policy (joint stage).

In the joint forward + backward graph, the outputs of the ops listed in ``save`` (by
default the matrix multiplies and the attention kernels: expensive to recompute) are kept
for the backward; every other forward op (norms, activations, rotary, views, softmax of
the loss ...) is recomputed in the backward from them instead of being stored. This is
the op-level policy of ``torch.utils.checkpoint``'s selective checkpointing, applied to the
whole step by the min-cut partitioner: less activation memory, some extra compute.

Example::

    pm = tg.PassManager(["selective_recompute"])
    step = pm.joint_module(gm, pm.run(gm))
"""

from __future__ import annotations

import dataclasses
import operator

from torch import fx

import torchgraft as tg
from torchgraft.ir.pattern import target_name

__all__ = ["SelectiveRecompute"]

DEFAULT_SAVE = [
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
]


@tg.register_handler("selective_recompute")
class SelectiveRecompute(tg.Handler):
    """Save the outputs of the ``save`` ops for the backward, recompute the rest."""

    stage = "joint"

    @dataclasses.dataclass(kw_only=True)
    class Options:
        save: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_SAVE))
        """ATen op names (``aten.mm.default``) whose outputs are saved; every other forward
        op is recomputed in the backward."""

    def activation_policy(self, node: fx.Node) -> str | None:
        if node.target is operator.getitem:  # an element of a multi-output op: follows it
            return None
        return "save" if target_name(node) in self.options.save else "recompute"
