"""Registered handlers at the non-default stages for the config tests (configs import this
module through ``imports: [stage_handlers]``)."""

from __future__ import annotations

import torch

import torchgraft as tg

aten = torch.ops.aten


@tg.register_handler("t_compile_relu")
class TCompileRelu(tg.Handler):
    """Compile stage: ``relu(x)`` → ``clamp_min(x, 0)`` in Inductor's post-grad graph."""

    stage = "compile"

    @tg.rule
    def relu(x):
        return aten.relu.default(x)

    @relu.replacement
    def _(x):
        return aten.clamp_min.default(x, 0.0)


@tg.register_handler("t_joint_gelu_backward")
class TJointGeluBackward(tg.Handler):
    """Joint stage: a rule on ``gelu_backward``, which the tiny Llama (SiLU) never has."""

    stage = "joint"

    @tg.rule
    def gelu_backward(grad, x):
        return aten.gelu_backward.default(grad, x)

    @gelu_backward.replacement
    def _(grad, x):
        return grad


@tg.register_handler("t_compile_mm_twin")
class TCompileMmTwin(tg.Handler):
    """Compile stage: a second rule on ``aten.mm`` (``a @ b`` as ``(bᵀ aᵀ)ᵀ``), unordered
    with ``onednn_matmul``: an ``overlap``."""

    stage = "compile"

    @tg.rule
    def mm(a, b):
        return aten.mm.default(a, b)

    @mm.replacement
    def _(a, b):
        return aten.permute.default(
            aten.mm.default(aten.permute.default(b, [1, 0]), aten.permute.default(a, [1, 0])),
            [1, 0],
        )
