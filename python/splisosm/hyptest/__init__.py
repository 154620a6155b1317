"""Hypothesis-test wrappers under ``splisosm.hyptest``, the package layout of splisosm 1.2.0.

Only the GLMM wrapper exists here (:mod:`splisosm.hyptest.glmm`); it is defined in
:mod:`splisosm.hyptest_glmm`.
"""
