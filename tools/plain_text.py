"""Docstrings (reStructuredText) as plain terminal text, for ``torchgraft list``."""

from __future__ import annotations

import re
import textwrap

__all__ = ["plain_text"]

# :func:`~torchgraft.ir.provenance.module_glob` -> module_glob; :class:`Handler` -> Handler
_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`(~?)([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``(.+?)``")
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}([^*\s][^*]*?)\*{1,2}(?![\w*])")


def _role(match: re.Match[str]) -> str:
    short, target = match.groups()
    return target.rsplit(".", 1)[-1] if short else target


def plain_text(doc: str, width: int = 88) -> str:
    """``doc`` without reST markup (roles, ``literals``, *emphasis*), each paragraph
    re-wrapped to ``width`` columns; indented blocks (examples) are kept as they are."""
    text = _EMPHASIS.sub(r"\1", _LITERAL.sub(r"\1", _ROLE.sub(_role, doc)))
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if any(line[:1].isspace() for line in lines):
            paragraphs.append(block)
        else:
            paragraphs.append(textwrap.fill(" ".join(lines), width=width))
    return "\n\n".join(paragraphs)
