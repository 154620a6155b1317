"""The per-gene models under ``splisosm.model``, the import path of the splisosm API page.

They are defined in :mod:`splisosm.glmm.model`; this module re-exports them.
"""

from splisosm.glmm.glm import MultinomGLM
from splisosm.glmm.model import MultinomGLMM

__all__ = ["MultinomGLM", "MultinomGLMM"]
