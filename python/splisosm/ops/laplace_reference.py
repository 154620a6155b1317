"""Dense float64 references of the Laplace-system ops.

They build ``H = blockdiag_j(Sigma_j^-1) + W`` as an explicit ``nq x nq`` matrix (isoform-major,
index ``j * n + s``) and use a dense Cholesky factor. Readable, exact and slow: they are the
ground truth of the tests and the fallback on devices without native kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from splisosm.ops._linalg import LOW_RANK_CLIP, checked_cholesky


def prior_eigenvalues(evals: Tensor, v: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Prior eigenvalues ``c = v (theta lambda + 1 - theta)`` ``(G, q, r)`` and ``d (G, q)``."""
    c = v[..., None] * (theta[..., None] * evals + (1 - theta[..., None]))
    return c, v * (1 - theta)


def eig_prior_precision(evals: Tensor, evecs: Tensor, v: Tensor, theta: Tensor) -> Tensor:
    """Dense ``Sigma_j^-1`` ``(G, q, n, n)`` of the eigenbasis prior.

    Full rank: ``V diag(1/c) V^T``. Low rank: ``I/d + V diag(clip(1/c - 1/d)) V^T``.
    """
    n, r = evecs.shape
    c, d = prior_eigenvalues(evals, v, theta)
    if r == n:
        return torch.einsum("sk,gjk,tk->gjst", evecs, 1 / c, evecs)
    corr = (1 / c - 1 / d[..., None]).clamp(-LOW_RANK_CLIP, LOW_RANK_CLIP)
    eye = torch.eye(n, dtype=evecs.dtype, device=evecs.device)
    return torch.einsum("sk,gjk,tk->gjst", evecs, corr, evecs) + eye / d[..., None, None]


def sparse_prior_precision(precision: Tensor, v: Tensor, theta: Tensor) -> Tensor:
    """Dense ``Sigma_j^-1`` ``(G, q, n, n)`` from the dense kernel precision ``Q = K^-1``."""
    n = precision.shape[0]
    eye = torch.eye(n, dtype=precision.dtype, device=precision.device)
    L, info = torch.linalg.cholesky_ex(precision)
    if int(info):
        raise RuntimeError("splisosm: the sparse precision Q is not positive definite")
    K = torch.cholesky_inverse(L)
    sigma = v[..., None, None] * (theta[..., None, None] * K + (1 - theta[..., None, None]) * eye)
    return torch.cholesky_inverse(torch.linalg.cholesky(sigma))


def dense_hessian(prior_prec: Tensor, W: Tensor) -> Tensor:
    """``H (G, nq, nq)`` from ``Sigma_j^-1 (G, q, n, n)`` and the blocks ``W (G, n, q, q)``."""
    G, q, n, _ = prior_prec.shape
    H = torch.zeros(G, q, n, q, n, dtype=prior_prec.dtype, device=prior_prec.device)
    for j in range(q):
        H[:, j, :, j, :] = prior_prec[:, j]
    spots = torch.arange(n, device=W.device)
    H[:, :, spots, :, spots] += W.permute(1, 0, 2, 3)  # advanced indices first: (n, G, q, q)
    return H.reshape(G, q * n, q * n)


def dense_solve_logdet(H: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """``H^-1 rhs`` for ``rhs (G, R, n, q)`` and ``log det H (G,)`` from one Cholesky factor."""
    G, R, n, q = rhs.shape
    L = checked_cholesky(H, "the Laplace system H")
    b = rhs.permute(0, 3, 2, 1).reshape(G, q * n, R)  # isoform-major columns
    x = torch.cholesky_solve(b, L).reshape(G, q, n, R).permute(0, 3, 2, 1)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return x, logdet


def _f64(*ts: Tensor) -> list[Tensor]:
    return [t.to(torch.float64) for t in ts]


def laplace_solve_eig_reference(
    W: Tensor, rhs: Tensor, evals: Tensor, evecs: Tensor, v: Tensor, theta: Tensor
) -> Tensor:
    """Dense reference of :func:`splisosm.ops.laplace_solve_eig` (``H^-1 rhs``)."""
    W64, rhs64, l64, V64, v64, t64 = _f64(W, rhs, evals, evecs, v, theta)
    H = dense_hessian(eig_prior_precision(l64, V64, v64, t64), W64)
    return dense_solve_logdet(H, rhs64)[0].to(rhs.dtype)


def laplace_logdet_eig_reference(
    W: Tensor, evals: Tensor, evecs: Tensor, v: Tensor, theta: Tensor
) -> Tensor:
    """Dense reference of :func:`splisosm.ops.laplace_logdet_eig` (``log det H``)."""
    W64, l64, V64, v64, t64 = _f64(W, evals, evecs, v, theta)
    H = dense_hessian(eig_prior_precision(l64, V64, v64, t64), W64)
    L = checked_cholesky(H, "the Laplace system H")
    return (2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)).to(W.dtype)


def csr_to_dense(crow: Tensor, col: Tensor, val: Tensor) -> Tensor:
    """Dense float64 matrix from CSR arrays."""
    n = crow.numel() - 1
    crow = crow.to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow.diff())
    dense = torch.zeros(n, n, dtype=torch.float64, device=val.device)
    return dense.index_put_((rows, col.to(torch.int64)), val.to(torch.float64), accumulate=True)


def laplace_sparse_reference(
    W: Tensor, rhs: Tensor, crow: Tensor, col: Tensor, val: Tensor, v: Tensor, theta: Tensor
) -> tuple[Tensor, Tensor]:
    """Dense reference of :func:`splisosm.ops.laplace_sparse` (``H^-1 rhs``, ``log det H``)."""
    W64, rhs64, v64, t64 = _f64(W, rhs, v, theta)
    prec = sparse_prior_precision(csr_to_dense(crow, col, val), v64, t64)
    x, logdet = dense_solve_logdet(dense_hessian(prec, W64), rhs64)
    return x.to(rhs.dtype), logdet.to(W.dtype)


def laplace_sparse_logdet_reference(
    W: Tensor, crow: Tensor, col: Tensor, val: Tensor, v: Tensor, theta: Tensor
) -> Tensor:
    """Dense reference of :func:`splisosm.ops.laplace_sparse_logdet`: ``log det H`` of the dense
    Hessian, differentiable by autograd."""
    W64, v64, t64 = _f64(W, v, theta)
    prec = sparse_prior_precision(csr_to_dense(crow, col, val), v64, t64)
    L = checked_cholesky(dense_hessian(prec, W64), "the Laplace system H")
    return (2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)).to(W.dtype)


def laplace_sparse_logdet_grad_reference(
    W: Tensor, crow: Tensor, col: Tensor, val: Tensor, v: Tensor, theta: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense reference of :func:`splisosm.ops.laplace_sparse_logdet_grad`: ``log det H`` of the
    dense Hessian and its gradients by autograd."""
    W64, v64, t64 = (t.detach().to(torch.float64).requires_grad_(True) for t in (W, v, theta))
    with torch.enable_grad():
        logdet = laplace_sparse_logdet_reference(W64, crow, col, val, v64, t64)
        grad_W, grad_v, grad_t = torch.autograd.grad(logdet.sum(), (W64, v64, t64))
    return (logdet.detach().to(W.dtype), grad_W.to(W.dtype), grad_v.to(v.dtype),
            grad_t.to(theta.dtype))


def sparse_shifted_solve_reference(
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    scale: Tensor,
    shift: Tensor,
    rhs: Tensor,
    trace_inverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense reference of :func:`splisosm.ops.sparse_shifted_solve`.

    ``M_g = scale_g Q + shift_g I``; returns ``M_g^-1 rhs_g`` for ``rhs (G, R, n)``,
    ``log det M_g (G,)`` and ``tr M_g^-1`` (``(G,)``, or empty without ``trace_inverse``).
    """
    Q = csr_to_dense(crow, col, val)
    eye = torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
    scale64, shift64, rhs64 = _f64(scale, shift, rhs)
    M = scale64[:, None, None] * Q + shift64[:, None, None] * eye
    L = checked_cholesky(M, "scale * Q + shift * I")
    x = torch.cholesky_solve(rhs64.transpose(1, 2), L).transpose(1, 2)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    if trace_inverse:
        trace = torch.diagonal(torch.cholesky_inverse(L), dim1=-2, dim2=-1).sum(-1)
    else:
        trace = rhs64.new_empty(0)
    return x.to(rhs.dtype), logdet.to(rhs.dtype), trace.to(rhs.dtype)


def sparse_inverse_diagonal_reference(crow: Tensor, col: Tensor, val: Tensor) -> Tensor:
    """Dense reference of :func:`splisosm.ops.sparse_inverse_diagonal` (``diag(M^-1)``)."""
    M = csr_to_dense(crow, col, val)
    return torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(M))).to(val.dtype)
