"""Argument checks shared by every public entry point.

Each checker returns the value converted to its Python type or raises ``ValueError`` with a
message that names the argument, says what was expected and shows what was given, so a wrong
setting fails where it is passed instead of deep inside a fit (or, worse, not at all).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool; numpy bools are accepted, 0/1 and strings are not."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise ValueError(f"`{name}` must be True or False, got {_shown(value)}")


def check_int(name: str, value: Any, *, minimum: int | None = None,
              also: tuple[int, ...] = ()) -> int:
    """``value`` as an int ``>= minimum`` (or one of the special values ``also``).

    Floats, strings and bools are refused, even when they look like integers: ``'10'`` or
    ``10.0`` is more often a mistake than a wish.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"`{name}` must be an int, got {_shown(value)}")
    value = int(value)
    if value in also or minimum is None or value >= minimum:
        return value
    extra = f" (or {', '.join(map(str, also))})" if also else ""
    raise ValueError(f"`{name}` must be an int >= {minimum}{extra}, got {value}")


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within ``[low, high]`` (ends excluded where ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"`{name}` must be a number, got {_shown(value)}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or below or above:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"`{name}` must be a finite number in {lo}, {hi}, got {value!r}")
    return value


def check_dict(name: str, value: Any) -> dict:
    """``value`` as a dict (``None`` gives an empty one)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a dict or None, got {_shown(value)}")
    return value


def check_keys(name: str, given: Mapping[str, Any], known: Iterable[str],
               hints: Mapping[str, str] | None = None) -> None:
    """Refuse keys of ``given`` that are not in ``known``, suggesting the closest known key.

    ``hints`` maps keys that belong elsewhere (e.g. an argument of ``fit()``) to a sentence
    saying where.
    """
    known = sorted(known)
    for key in given:
        if key in known:
            continue
        if hints and key in hints:
            raise ValueError(f"`{name}` has the key {key!r}: {hints[key]}")
        close = difflib.get_close_matches(str(key), known, n=1)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"`{name}` has an unknown key {key!r}{maybe}. Valid keys: {', '.join(known)}."
        )
