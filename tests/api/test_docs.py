"""The API's docstrings are whole: every argument documented, every shared part filled in."""

from __future__ import annotations

import inspect
import re

import pytest

from splisosm._docs import fill_doc
from splisosm.config import GLMMConfig
from splisosm.hyptest_glmm import SplisosmGLMM

DOCUMENTED = [SplisosmGLMM, SplisosmGLMM.setup_data, SplisosmGLMM.fit, SplisosmGLMM.test_spatial_variability,
              SplisosmGLMM.test_differential_usage, SplisosmGLMM.load, GLMMConfig]


@pytest.mark.parametrize("obj", DOCUMENTED, ids=lambda o: o.__qualname__)
def test_every_argument_is_documented_and_no_placeholder_is_left(obj) -> None:
    doc = inspect.getdoc(obj)
    assert not re.search(r"^\s*\{\w+\}\s*$", doc, re.M), doc
    section = doc.split("Parameters\n----------\n", 1)[1]
    entries = set(re.findall(r"^(\*{0,2}\w+)$", section, re.M))
    target = obj.__init__ if inspect.isclass(obj) else obj
    wanted = {("**" + n if p.kind is p.VAR_KEYWORD else n)
              for n, p in inspect.signature(target).parameters.items() if n != "self"}
    assert wanted <= entries, wanted - entries


def test_a_missing_placeholder_is_an_error() -> None:
    def documented() -> None:
        """Summary without the placeholder."""

    with pytest.raises(ValueError, match="no line"):
        fill_doc(part="text")(documented)


def test_parts_take_the_placeholder_indentation() -> None:
    def documented() -> None:
        """Summary.

        {part}
        """

    fill_doc(part="first\n    second")(documented)
    assert "        first\n            second" in documented.__doc__
