"""The per-gene multinomial GLM(M)s, their fitting and the hypothesis tests built on them.

``splisosm.glmm.MultinomGLM`` and ``MultinomGLMM`` are importable here as in splisosm 1.2.0.
"""

from splisosm.glmm.glm import MultinomGLM
from splisosm.glmm.model import MultinomGLMM

__all__ = ["MultinomGLM", "MultinomGLMM"]
