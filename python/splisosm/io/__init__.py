"""Saving and loading analyses (see :meth:`splisosm.hyptest_glmm.SplisosmGLMM.save`)."""

from splisosm.io.persistence import DamagedModelError

__all__ = ["DamagedModelError"]
