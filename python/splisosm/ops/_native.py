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


def has_native_kernel(op_name: str, device: torch.device) -> bool:
    """Whether ``torch.ops.splisosm.<op_name>`` has a compiled kernel for ``device``."""
    if _force_reference or not NATIVE_AVAILABLE:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"splisosm::{op_name}", key)
