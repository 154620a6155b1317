"""splisosm: spatially variable and differentially used RNA isoforms with a multinomial GLMM."""

from importlib.metadata import PackageNotFoundError, version

import torch  # noqa: F401  (loads libtorch before the compiled extension)

from splisosm import ops

try:
    __version__ = version("splisosm")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0+unknown"

__all__ = ["ops", "__version__"]
