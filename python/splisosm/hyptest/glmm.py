"""The GLMM wrapper under ``splisosm.hyptest.glmm``, the import path splisosm 1.2.0 gives it.

Re-exports :mod:`splisosm.hyptest_glmm`, where the classes are defined, so that code written for
either layout imports the same classes.
"""

from splisosm.hyptest_glmm import IsoFullModel, IsoNullNoSpVar, SplisosmGLMM

__all__ = ["SplisosmGLMM", "IsoFullModel", "IsoNullNoSpVar"]
