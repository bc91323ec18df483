"""``metrics.json`` as strict JSON: no ``NaN`` / ``Infinity`` tokens, which ``JSON.parse``
and most JSON readers other than Python's refuse."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["WHY_SUFFIX", "dumps_strict"]

WHY_SUFFIX = "_why"
"""A non-finite value ``key`` becomes ``null`` beside ``key + WHY_SUFFIX``, which says what it was."""


def dumps_strict(data: Mapping[str, Any]) -> str:
    """``data`` as indented strict JSON. A non-finite float is written as ``null`` and its
    key gets a sibling ``"<key>_why"``: an SQNR (a key ending in ``_db``) of ``+inf`` is an
    exact match, ``-inf`` a zero reference, a ``tolerance_db`` of ``-inf`` no tolerance;
    elsewhere the value is named (``nan``, ``inf``).
    In a list, the null entries' indices are named instead."""
    return json.dumps(_strict(data), indent=2, allow_nan=False)


def _strict(value: Any) -> Any:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out[key] = _strict(item)
            why = _why(str(key), item)
            if why is not None:
                out[f"{key}{WHY_SUFFIX}"] = why
        return out
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# What a non-finite value means, by the key's suffix (the longest that fits wins).
_MEANINGS: dict[str, dict[float, str]] = {
    "_db": {
        math.inf: "inf: no difference from the reference (exact)",
        -math.inf: "-inf: the reference is all zeros",
    },
    "tolerance_db": {-math.inf: "-inf: no tolerance (the handler does not approximate)"},
}


def _why(key: str, value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        suffixes = sorted((s for s in _MEANINGS if key.endswith(s)), key=len, reverse=True)
        for suffix in suffixes:
            if value in _MEANINGS[suffix]:
                return _MEANINGS[suffix][value]
        return str(value)
    if isinstance(value, (list, tuple)):
        bad = [i for i, v in enumerate(value) if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            kinds = sorted({str(value[i]) for i in bad})
            return f"entries {bad} are null: not finite ({', '.join(kinds)})"
    return None
