"""The spatial kernels under ``splisosm.kernel``, the import path of the splisosm API page.

They are defined in :mod:`splisosm.spatial.kernel`; this module re-exports them.
"""

from splisosm.spatial.kernel import IdentityKernel, SpatialCovKernel

__all__ = ["SpatialCovKernel", "IdentityKernel"]
