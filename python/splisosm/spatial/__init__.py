"""Spot graphs and the CAR spatial covariance kernel, and the kernel inputs the models take."""

from splisosm.spatial.kernel import IdentityKernel, SpatialCovKernel

__all__ = ["SpatialCovKernel", "IdentityKernel"]
