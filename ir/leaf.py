"""Leaf calls: functions a replacement emits as one ``call_function`` node, never inlined.

A replacement is traced by calling it with proxies, so an ordinary Python function it calls
is inlined (its ops are recorded) — and every op is run on fake tensors. A *leaf* is kept
as one call instead, and is not run while rewriting: its node's ``meta["val"]`` comes from
the fake function declared with :func:`leaf` (run on fake tensors; it must compute shapes,
not values). Functions registered with ``torch.fx.wrap`` are leaves too (as in
``torch.fx.replace_pattern``); without a declared fake function their node has no
``meta["val"]``, so nothing in the replacement may compute on their result and the output
shape check cannot see it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from torch import fx
from torch.fx import _symbolic_trace

_FAKES: dict[Callable, Callable | None] = {}


def _find_proxy(args: tuple, kwargs: dict) -> fx.Proxy | None:
    found: list[fx.Proxy] = []
    fx.node.map_aggregate(
        (args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else a
    )
    return found[0] if found else None


def leaf(fn: Callable | None = None, /, *, fake: Callable | None = None) -> Any:
    """Declare ``fn`` a leaf: traced into one ``call_function`` node of ``fn`` itself.

    ``fake`` takes the same arguments as ``fn`` with tensors as fake tensors and returns
    fake tensors of the output's shape and dtype (``lambda x, w: x.new_empty(...)``); it
    gives the node its ``meta["val"]``. Called outside a trace, the leaf runs ``fn``.
    Works bare and with keywords::

        @tg.leaf(fake=lambda x: torch.empty_like(x))
        def my_kernel(x): ...
    """

    def declare(function: Callable) -> Callable:
        _FAKES[function] = fake

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            proxy = _find_proxy(args, kwargs)
            if proxy is None:
                return function(*args, **kwargs)
            return proxy.tracer.create_proxy("call_function", function, args, kwargs)

        return call

    return declare if fn is None else declare(fn)


def _is_fx_wrapped(target: Any) -> bool:
    globals_ = getattr(target, "__globals__", None)
    name = getattr(target, "__name__", None)
    return globals_ is not None and (id(globals_), name) in _symbolic_trace._wrapped_fns_to_patch


def is_leaf(target: Any) -> bool:
    """Whether ``target`` is a :func:`leaf` or a ``torch.fx.wrap``'d function."""
    try:
        if target in _FAKES:
            return True
    except TypeError:  # unhashable target
        return False
    return _is_fx_wrapped(target)


def leaf_fake(target: Any) -> Callable | None:
    """The fake function declared for leaf ``target`` (None if there is none)."""
    return _FAKES.get(target)


@contextlib.contextmanager
def patched_fx_wraps() -> Iterator[None]:
    """A context in which ``torch.fx.wrap``'d functions record one call when given proxies,
    as they do inside ``torch.fx.symbolic_trace`` (torch's own patcher does it)."""
    with _symbolic_trace._new_patcher() as patcher:
        _symbolic_trace._patch_wrapped_functions(patcher)
        yield
