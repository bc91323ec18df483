"""Where a node came from: its module FQN, the user's source line, a short description."""

from __future__ import annotations

import fnmatch
import functools
import os
import re

import torch
from torch import fx

_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FRAME = re.compile(
    r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>[^\n]+)\n(?P<code>[^\n]*)'
)

META_KEY = "torchgraft"
"""``node.meta`` key of the provenance torchgraft stamps on nodes it creates."""


def module_fqn(node: fx.Node) -> str:
    """FQN of the innermost module the node was traced in (``""`` for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = next(reversed(stack.values()))[0]
    return _normalize_fqn(path)


def module_stack(node: fx.Node) -> list[str]:
    """FQNs of the modules the node was traced in, outermost first (the root excluded)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [fqn for fqn in (_normalize_fqn(path) for path, _ in stack.values()) if fqn]


def graph_module_fqns(graph: fx.Graph) -> list[str]:
    """FQNs of every module some node of ``graph`` was traced in, sorted (the root excluded).
    Distinct paths are normalized once: a graph repeats a few hundred over thousands of nodes."""
    paths = {
        path
        for node in graph.nodes
        for path, _ in (node.meta.get("nn_module_stack") or {}).values()
    }
    return sorted({fqn for fqn in map(_normalize_fqn, paths) if fqn})


@functools.lru_cache(maxsize=4096)
def _normalize_fqn(path: str) -> str:
    # Strict-mode export spells paths like "L['self'].layers[0].wq".
    if "[" not in path:  # already dotted (non-strict export): the common case, no regex
        return path.lstrip(".")
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\w+)\]", r".\1", path).lstrip(".")


def is_user_file(filename: str) -> bool:
    """True for files that are neither torch's nor torchgraft's own code."""
    path = os.path.abspath(filename)
    return not (path.startswith(_TORCH_DIR) or path.startswith(_PACKAGE_DIR + os.sep + "ir"))


def user_frame_from_text(text: str | None) -> str | None:
    """The innermost user frame in a formatted traceback, as ``file:line: code``."""
    if not text:
        return None
    user = [m for m in _FRAME.finditer(text) if is_user_file(m["file"])]
    if not user:
        return None
    m = user[-1]
    return f"{m['file']}:{m['line']}: {m['code'].strip()}"


def user_source(node: fx.Node) -> str | None:
    """The user's source line that produced ``node`` (``file:line: code``), if recorded."""
    return user_frame_from_text(node.meta.get("stack_trace"))


def describe(node: fx.Node) -> str:
    """``name`` plus, where known, its module FQN and the user's source line."""
    parts = [f"node '{node.name}'"]
    fqn = module_fqn(node)
    if fqn:
        parts.append(f"in module '{fqn}'")
    source = user_source(node)
    if source:
        parts.append(f"from {source}")
    return " ".join(parts)


def module_glob(fqn: str, globs: list[str]) -> str | None:
    """The first glob that matches a dotted sub-path of module ``fqn``, or None.

    Globs are anchored at ``.`` boundaries but not at the ends, so a glob names a module
    wherever it sits and covers the modules inside it: ``"output"`` matches ``output`` and
    ``model.output`` (a model wrapped in a loss module) but not ``outputs`` nor
    ``output_proj``; ``"attention"`` matches ``layers.0.attention.wq``; ``"layers.0"``
    every module of the first block; ``"w*"`` any module whose name starts with ``w``.
    """
    parts = fqn.split(".")
    paths = [".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    return next((g for g in globs if any(fnmatch.fnmatchcase(p, g) for p in paths)), None)
