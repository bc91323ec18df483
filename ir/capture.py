"""Turn an ``nn.Module`` into an ``fx.GraphModule`` that shares the model's parameters."""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from torchgraft.ir.errors import CaptureError
from torchgraft.ir.provenance import is_user_file, user_frame_from_text

Method = Literal["export", "symbolic_trace"]


def capture(
    model: nn.Module,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    method: Method = "export",
    strict: bool = False,
) -> fx.GraphModule:
    """Capture ``model`` called with ``args`` / ``kwargs`` as an ``fx.GraphModule``.

    ``method="export"`` (default) uses ``torch.export.export`` and returns its ATen-level
    training graph (``aten.linear``, ``aten.scaled_dot_product_attention`` ... kept whole);
    ``method="symbolic_trace"`` gives a torch-level graph traced through every submodule
    (``torch._C._nn.linear``, ``torch.relu`` ...). Either way the graph module's parameters
    and buffers are the model's own objects under the same FQNs, so training through it
    updates ``model``, and every node has ``meta["val"]`` (a fake tensor),
    ``meta["nn_module_stack"]`` and ``meta["stack_trace"]``. The same tensor passed twice
    (``capture(m, (t, t))``) is captured as two independent inputs: ``torch.export`` would
    otherwise bake the alias into the graph and ignore the second argument forever after.

    Example::

        gm = tg.capture(model, (tokens,))
        report = tg.PassManager(["float8"]).run(gm)
        loss = gm(tokens).sum(); loss.backward()   # gradients land on model's parameters
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture expects an nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    args, kwargs = _unaliased(args, dict(kwargs or {}))
    if method == "export":
        return _export(model, args, kwargs, strict)
    if method == "symbolic_trace":
        return _symbolic_trace(model, args, kwargs)
    raise ValueError(f"unknown capture method {method!r}; use 'export' or 'symbolic_trace'")


def _unaliased(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Clone every tensor that was already passed as an earlier argument."""
    seen: set[int] = set()

    def fresh(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in seen:
            return value.clone()
        seen.add(id(value))
        return value

    args = tuple(fresh(a) for a in args)
    return args, {k: fresh(v) for k, v in kwargs.items()}


def _export(model: nn.Module, args: tuple, kwargs: dict, strict: bool) -> fx.GraphModule:
    try:
        program = torch.export.export(model, args, kwargs, strict=strict)
    except Exception as exc:
        raise _capture_error(model, "torch.export", exc, "method='symbolic_trace'") from exc
    return program.module()


class _ThroughModules(fx.Tracer):
    """Traces into every submodule so the graph holds functions, not module calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return False


def _symbolic_trace(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    tracer = _ThroughModules()
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(model)
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
        placeholders = [n.target for n in graph.nodes if n.op == "placeholder"]
        bound = dict(zip(placeholders, args))
        bound.update(kwargs)
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(
            *(bound[name] for name in placeholders if name in bound)
        )
    except Exception as exc:
        raise _capture_error(model, "torch.fx.symbolic_trace", exc, "method='export'") from exc
    return gm


def _capture_error(model: nn.Module, tool: str, exc: Exception, other: str) -> CaptureError:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if is_user_file(f.filename)]
    if frames:
        frame = frames[-1]
        where = f"{frame.filename}:{frame.lineno}: {frame.line}"
    else:
        where = user_frame_from_text(str(exc))
    headline = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    message = f"{tool} could not capture {type(model).__name__}: {type(exc).__name__}: {headline}"
    if where:
        message += f"\n  failing source line: {where}"
    message += f"\n  hint: try tg.capture(model, args, {other})"
    return CaptureError(message)
