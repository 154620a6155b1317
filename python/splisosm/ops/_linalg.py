"""Dense linear-algebra helpers shared by the Laplace system and the dense references.

Production code (:mod:`splisosm.glmm.laplace`) and the test references
(:mod:`splisosm.ops.laplace_reference`) both use these; they live here so that production never
imports from a reference module.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Bound on the low-rank correction ``1/c - 1/d`` of the prior precision. With ``r < n``
#: eigenpairs the prior precision is ``I/d + V diag(1/c - 1/d) V^T``; as ``theta -> 1`` the
#: residual eigenvalue ``d = v (1 - theta)`` goes to zero and the correction is clipped to
#: ``[-LOW_RANK_CLIP, LOW_RANK_CLIP]`` (the native kernels use the same bound).
LOW_RANK_CLIP = 1e6


def checked_cholesky(M: Tensor, what: str) -> Tensor:
    """Batched Cholesky factor of ``M (G, ..., k, k)`` that names the gene on failure.

    Parameters
    ----------
    M
        Symmetric matrices with the gene as leading dimension.
    what
        Description of ``M`` used in the error message.

    Returns
    -------
    Tensor
        The lower Cholesky factor, shaped like ``M``.

    Raises
    ------
    RuntimeError
        If any matrix is not positive definite; the message names the first such gene (leading
        index).
    """
    L, info = torch.linalg.cholesky_ex(M)
    bad = torch.nonzero(info.reshape(M.shape[0], -1).any(1)).flatten()
    if bad.numel():
        raise RuntimeError(
            f"splisosm: gene {int(bad[0])}: {what} is not positive definite "
            "(Cholesky factorisation failed)"
        )
    return L
