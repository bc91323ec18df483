"""Typed handler options: a dataclass per handler, validated from plain config values.

Each option is documented by a string literal right under its field (the convention of
torchtitan's converter configs); :func:`option_docs` reads those strings back with ``ast``
for ``torchgraft list``::

    @dataclasses.dataclass(kw_only=True)
    class Options:
        recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
        '''How scales are computed.'''
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import reprlib
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from torchgraft.ir.errors import TorchgraftError


class OptionError(TorchgraftError):
    """A handler option is unknown or has a value of the wrong type."""

    def __init__(self, message: str, *, handler: str, option: str | None) -> None:
        super().__init__(message)
        self.handler = handler
        self.option = option


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 8


def shown(value: Any) -> str:
    """``repr(value)`` cut to a readable size (nested and long containers elided with
    ``...``): error messages quote user values with it, however large they are."""
    return _SHORT.repr(value)


def type_name(tp: Any) -> str:
    """Readable name of a type annotation (``list[str]``, ``'a' | 'b'``)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", repr(tp))


def conforms(value: Any, tp: Any) -> bool:
    """Whether a plain (YAML-like) value fits annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin in (list, tuple, Sequence):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(conforms(v, item) for v in value)
    if origin in (dict, Mapping):
        key, val = args or (Any, Any)
        return isinstance(value, dict) and all(
            conforms(k, key) and conforms(v, val) for k, v in value.items()
        )
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def build_options(options_cls: type, values: Mapping[str, Any], *, handler: str) -> Any:
    """Instantiate ``options_cls`` from ``values``, rejecting unknown names and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = typing.get_type_hints(options_cls)
    for name, value in values.items():
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(fields) or "none"
            raise OptionError(
                f"handler '{handler}' has no option {name!r}{hint} (options: {known})",
                handler=handler,
                option=name,
            )
        if not conforms(value, hints[name]):
            raise OptionError(
                f"handler '{handler}' option {name!r} must be {type_name(hints[name])}, "
                f"got {shown(value)}",
                handler=handler,
                option=name,
            )
    instance = options_cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise OptionError(f"handler '{handler}': {exc}", handler=handler, option=None) from exc
    return instance


@dataclasses.dataclass(frozen=True)
class OptionDoc:
    """One documented option of a handler, as ``torchgraft list`` shows it."""

    name: str
    type: str
    default: str
    doc: str


def option_docs(options_cls: type) -> list[OptionDoc]:
    """Name, type, default and docstring of each field of an ``Options`` dataclass."""
    hints = typing.get_type_hints(options_cls)
    docs: dict[str, str] = {}
    for klass in reversed(options_cls.__mro__):  # a subclass's docs override its base's
        if dataclasses.is_dataclass(klass):
            docs.update(_field_docstrings(klass))
    out = []
    for field in dataclasses.fields(options_cls):
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        out.append(
            OptionDoc(field.name, type_name(hints[field.name]), default, docs.get(field.name, ""))
        )
    return out


def _field_docstrings(cls: type) -> dict[str, str]:
    """Field name → the string literal statement that follows its declaration."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined in a REPL or a string: no docs to show
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for stmt, following in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs
