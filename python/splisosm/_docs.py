"""Docstring parts written once, next to the code they describe, and filled into the API's docstrings."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def fill_doc(**parts: str) -> Callable[[T], T]:
    """Replace each line ``{name}`` of the decorated object's docstring by ``parts[name]``.

    Parts are written without indentation; each line takes the indentation of the placeholder.
    """

    def fill(obj: T) -> T:
        doc = obj.__doc__ or ""
        for name, text in parts.items():
            placeholder = re.compile(r"^([ \t]*)\{" + name + r"\}$", re.M)
            if not placeholder.search(doc):
                raise ValueError(f"docstring of {obj!r} has no line {{{name}}}")
            doc = placeholder.sub(lambda m: "\n".join(m.group(1) + line if line else ""
                                                      for line in text.strip("\n").splitlines()), doc)
        obj.__doc__ = doc
        return obj

    return fill
