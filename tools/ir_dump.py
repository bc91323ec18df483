"""The graph's code after each handler of a plan, numbered in run order, with a diff per step.

``dump_ir(gm, ["fuse_rms_norm", "float8"], "ir/")`` writes::

    ir/00_captured.py
    ir/01_fuse_rms_norm.py   ir/01_fuse_rms_norm.diff
    ir/02_float8.py          ir/02_float8.diff

Each ``.py`` is ``print_readable()`` of the graph module (with shapes and the user's source
lines as comments); each ``.diff`` is the unified diff from the previous step.

:func:`dump_stages` does the same for every graph stage the plan uses: the graph stage as
above, and one subdirectory per graph of the later stages, numbered over that stage's
handlers (``joint/``; ``compile_forward/``, ``compile_backward/`` for Inductor's post-grad
graphs, see :mod:`torchgraft.tools.stage_graphs`)::

    ir/compile_backward/00_captured.py
    ir/compile_backward/01_onednn_matmul.py   ir/compile_backward/01_onednn_matmul.diff
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import fx

from torchgraft.ir.graph_copy import copy_graph_module
from torchgraft.passes.compile_capture import graph_name
from torchgraft.passes.manager import HandlerSpec, PassManager
from torchgraft.passes.report import Report
from torchgraft.tools.graph_copy import run_on_copy
from torchgraft.tools.stage_graphs import stage_graphs


def _code(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False)


def _file_stem(index: int, name: str) -> str:
    return f"{index:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def dump_ir(
    gm: fx.GraphModule,
    handlers: Sequence[HandlerSpec],
    out_dir: str | Path,
    stage: str = "graph",
) -> list[Path]:
    """Write the code of ``gm`` and of the graph after each handler to ``out_dir``.

    ``gm`` is not changed. Step ``k`` applies the plan's first ``k`` handlers, as one plan,
    to a fresh copy of ``gm``, so every step sees the same ordering and checks as a full
    run. ``gm`` is a graph of ``stage`` (default: the captured graph); only that stage's
    handlers are steps. Returns the files written, in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pm = PassManager(handlers)
    plan = pm.handlers
    in_stage = {s.name for s in pm.stage_steps(stage)} if stage != "graph" else None
    previous_name, previous = f"{_file_stem(0, 'captured')}.py", _code(gm)
    (out / previous_name).write_text(previous, encoding="utf-8")
    paths = [out / previous_name]
    steps = [
        i for i, h in enumerate(plan, start=1) if in_stage is None or h.display_name in in_stage
    ]
    for number, index in enumerate(steps, start=1):
        handler = plan[index - 1]
        stem = _file_stem(number if in_stage is not None else index, handler.display_name)
        code = _code(run_on_copy(gm, plan[:index], stage)[0])
        diff = difflib.unified_diff(
            previous.splitlines(keepends=True),
            code.splitlines(keepends=True),
            fromfile=previous_name,
            tofile=f"{stem}.py",
        )
        for suffix, text in ((".py", code), (".diff", "".join(diff))):
            path = out / f"{stem}{suffix}"
            path.write_text(text, encoding="utf-8")
            paths.append(path)
        previous_name, previous = f"{stem}.py", code
    return paths


def dump_stages(
    gm: fx.GraphModule,
    inputs: Sequence[torch.Tensor] | None,
    handlers: Sequence[HandlerSpec],
    out_dir: str | Path,
) -> list[Path]:
    """:func:`dump_ir` of the captured graph ``gm`` into ``out_dir``, then of each graph of
    the joint and compile stages the plan uses into a subdirectory (one step on ``inputs``
    gives them: an AOTAutograd trace, an Inductor compile). Returns the files written."""
    paths = dump_ir(gm, handlers, out_dir)
    stages = PassManager(handlers).stages
    for stage in ("joint", "compile"):
        if stage in stages:
            for graph in stage_graphs(gm, handlers, stage, inputs):
                folder = Path(out_dir) / graph.label.replace(" ", "_")
                paths += dump_ir(graph.module, handlers, folder, stage)
    return paths


def compile_dumper(
    pm: PassManager, handlers: Sequence[HandlerSpec], out_dir: str | Path
) -> Callable[[fx.GraphModule], Report]:
    """A ``rewrite`` for :meth:`~torchgraft.PassManager.compile_module` that, for each
    post-grad graph Inductor compiles, writes :func:`dump_ir` of it over the compile-stage
    handlers to ``out_dir/compile_<forward|backward>/``, then rewrites it as usual. A graph
    loaded from the FX graph cache is not compiled, so it is not written."""
    names: list[str] = []

    def rewrite(owner: fx.GraphModule) -> Report:
        names.append(graph_name(owner, names))
        dump_ir(
            copy_graph_module(owner), handlers, Path(out_dir) / f"compile_{names[-1]}", "compile"
        )
        return pm.rewrite_stage(owner, "compile", no_match=False)

    return rewrite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--dump-ir DIR`` option (for ``torchgraft run``, ``check`` and ``viz``)."""
    parser.add_argument(
        "--dump-ir",
        type=Path,
        metavar="DIR",
        help="write the graph's code after each handler, numbered, plus a diff per step; "
        "for a plan with joint or compile-stage handlers also each graph of those stages, "
        "in a subdirectory (joint/, compile_forward/, compile_backward/: one traced or "
        "compiled step)",
    )
