"""The graph's code after each handler of a plan, numbered in run order, with a diff per step.

``dump_ir(gm, ["fuse_rms_norm", "float8"], "ir/")`` writes::

    ir/00_captured.py
    ir/01_fuse_rms_norm.py   ir/01_fuse_rms_norm.diff
    ir/02_float8.py          ir/02_float8.diff

Each ``.py`` is ``print_readable()`` of the graph module (with shapes and the user's source
lines as comments); each ``.diff`` is the unified diff from the previous step.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence
from pathlib import Path

from torch import fx

from torchgraft.passes.manager import HandlerSpec, PassManager
from torchgraft.tools.graph_copy import run_on_copy


def _code(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False)


def _file_stem(index: int, name: str) -> str:
    return f"{index:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def dump_ir(gm: fx.GraphModule, handlers: Sequence[HandlerSpec], out_dir: str | Path) -> list[Path]:
    """Write the code of ``gm`` and of the graph after each handler to ``out_dir``.

    ``gm`` is not changed. Step ``k`` applies the plan's first ``k`` handlers, as one plan,
    to a fresh copy of ``gm``, so every step sees the same ordering and checks as a full
    run. Returns the files written, in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = PassManager(handlers).handlers
    previous_name, previous = f"{_file_stem(0, 'captured')}.py", _code(gm)
    (out / previous_name).write_text(previous, encoding="utf-8")
    paths = [out / previous_name]
    for index, handler in enumerate(plan, start=1):
        stem = _file_stem(index, handler.display_name)
        code = _code(run_on_copy(gm, plan[:index])[0])
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--dump-ir DIR`` option (for ``torchgraft run``, ``check`` and ``viz``)."""
    parser.add_argument(
        "--dump-ir",
        type=Path,
        metavar="DIR",
        help="write the graph's code after each handler, numbered, plus a diff per step",
    )
