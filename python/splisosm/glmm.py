"""The per-gene models under ``splisosm.glmm``, the import path splisosm 1.2.0 gives them.

They are defined in :mod:`splisosm.model`; this module only re-exports them so that code written
for either layout imports the same classes.
"""

from splisosm.model import MultinomGLM, MultinomGLMM

__all__ = ["MultinomGLM", "MultinomGLMM"]
