"""splisosm: spatially variable and differentially used RNA isoforms with a multinomial GLMM."""

from importlib.metadata import PackageNotFoundError, version

import torch  # noqa: F401  (loads libtorch before the compiled extension)

from splisosm import ops

try:
    __version__ = version("splisosm")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0+unknown"

__all__ = ["SplisosmGLMM", "ops", "pl", "__version__"]


def __getattr__(name: str):
    # Imported on first use: the wrapper pulls in pandas/anndata, which plain op users don't need.
    if name == "SplisosmGLMM":
        from splisosm.hyptest_glmm import SplisosmGLMM

        return SplisosmGLMM
    if name == "pl":  # plots, as scanpy's sc.pl (matplotlib is imported when one is drawn)
        import splisosm.pl

        return splisosm.pl
    raise AttributeError(f"module 'splisosm' has no attribute {name!r}")
