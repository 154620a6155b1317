"""Loading the compiled extension and choosing between native kernels and references."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

try:  # the compiled module registers torch.ops.splisosm.* when imported
    from splisosm import _C  # noqa: F401

    NATIVE_AVAILABLE = True
except ImportError:  # pragma: no cover - only without a build (e.g. a source checkout)
    NATIVE_AVAILABLE = False

_force_reference = os.environ.get("SPLISOSM_FORCE_REFERENCE", "") not in ("", "0")


@contextlib.contextmanager
def use_reference(enabled: bool = True) -> Iterator[None]:
    """Route every op through its pure-torch reference inside the ``with`` block.

    This is what devices without native kernels (Apple MPS) get automatically; forcing it on
    CPU lets tests prove the fallback works end to end. The environment variable
    ``SPLISOSM_FORCE_REFERENCE=1`` does the same for a whole process.
    """
    global _force_reference
    previous = _force_reference
    _force_reference = enabled
    try:
        yield
    finally:
        _force_reference = previous


def cuda_kernels_built() -> bool:
    """Whether this build of the extension contains the CUDA kernels.

    A build next to a CUDA torch but without a CUDA compiler compiles the CPU kernels only; the
    dispatcher then has no CUDA kernel for any splisosm op.
    """
    return NATIVE_AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(
        "splisosm::multinom_terms", "CUDA"
    )


def check_cuda_kernels() -> None:
    """Raise ``RuntimeError`` if torch can use CUDA but splisosm was built without its CUDA kernels.

    Without this, ``device='cuda'`` would quietly run every op through the slow pure-torch
    references. With a CPU-only torch nothing is raised here: torch's own error about CUDA comes
    first and names the actual problem.
    """
    if torch.version.cuda is None or not NATIVE_AVAILABLE or cuda_kernels_built():
        return
    major = torch.version.cuda.split(".")[0]
    raise RuntimeError(
        "splisosm was built without its CUDA kernels, so device='cuda' is unavailable: torch "
        f"{torch.__version__} supports CUDA {torch.version.cuda}, but the build found no CUDA "
        f"{major}.x compiler (nvcc) or was run with SPLISOSM_WITH_CUDA=OFF. To add them, put the "
        f"nvcc of a CUDA {major}.x toolkit on PATH and reinstall splisosm from its source tree with "
        "`python3 -m pip install --no-build-isolation --force-reinstall --no-deps .`; "
        "or use device='cpu'."
    )


def has_native_kernel(op_name: str, device: torch.device) -> bool:
    """Whether ``torch.ops.splisosm.<op_name>`` has a compiled kernel for ``device``."""
    if _force_reference or not NATIVE_AVAILABLE:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"splisosm::{op_name}", key)
