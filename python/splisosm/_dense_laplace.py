"""Dense implementation of the ``LaplaceSystem`` interface (small ``n`` only).

Used by the per-gene models when :mod:`splisosm.laplace` (the structured implementation) is not
importable, and for the dense autograd route of ``marginal_gd``. Every spatial input is reduced to
an eigen form ``Sigma_j = U diag(c) U^T + d (I - U U^T)`` (SPEC §5.3-5.4); the Hessian
``blockdiag_j(Sigma_j^-1) + W`` is formed as an ``nq x nq`` matrix and Cholesky-factorised.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NULL_THETA = 1e-10


class DenseLaplaceSystem:
    """Same constructor and methods as ``splisosm.laplace.LaplaceSystem``; O((nq)^3) per gene."""

    def __init__(self, n_spots: int, *, evals=None, evecs=None, precision=None,
                 identity: bool = False) -> None:
        self.n = int(n_spots)
        self.identity = bool(identity)
        if evals is None and precision is not None and not identity:
            dense = precision.toarray() if hasattr(precision, "toarray") else np.asarray(precision)
            lam, vec = np.linalg.eigh(np.linalg.inv(dense))
            order = np.argsort(lam)[::-1].copy()
            evals, evecs = torch.from_numpy(lam[order]), torch.from_numpy(vec[:, order])
        self.evals = None if evals is None else torch.as_tensor(evals)
        self.evecs = None if evecs is None else torch.as_tensor(evecs)

    @property
    def rank(self) -> int | None:
        return None if self.evals is None else int(self.evals.shape[0])

    def _is_null(self, theta: Tensor) -> bool:
        return self.identity or self.evals is None or bool((theta < NULL_THETA).all())

    def _eigen(self, v: Tensor, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lam = self.evals.to(v)
        U = self.evecs.to(v)
        c = v[..., None] * (theta[..., None] * lam + 1 - theta[..., None])  # (G, q, r)
        d = v * (1 - theta)  # (G, q)
        return U, c, d

    def prior_terms(
        self, nu: Tensor, v: Tensor, theta: Tensor, with_precision: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(quad, logdet_sigma, Sigma^-1 nu)`` per gene, differentiable.

        ``with_precision`` is accepted for interface parity; this dense system always returns
        the precision product (it needs it for ``quad``)."""
        n = self.n
        if self._is_null(theta):
            prec_nu = nu / v[:, None, :]
            quad = (nu * prec_nu).sum((1, 2))
            return quad, n * torch.log(v).sum(-1), prec_nu
        U, c, d = self._eigen(v, theta)
        r = U.shape[1]
        z = torch.einsum("sk,gsj->gjk", U, nu)  # (G, q, r)
        coef = 1.0 / c
        logdet = torch.log(c).sum((1, 2))
        prec_nu = torch.einsum("sk,gjk->gsj", U, coef * z)
        if r < n:
            coef_res = (coef - 1.0 / d[..., None]).clamp(-1e6, 1e6)
            prec_nu = nu / d[:, None, :] + torch.einsum("sk,gjk->gsj", U, coef_res * z)
            logdet = logdet + (n - r) * torch.log(d).sum(-1)
        quad = (nu * prec_nu).sum((1, 2))
        return quad, logdet, prec_nu

    def sigma_inv(self, v: Tensor, theta: Tensor) -> Tensor:
        """Dense ``Sigma_j^-1`` as ``(G, q, n, n)``, differentiable in ``v`` and ``theta``."""
        n = self.n
        eye = torch.eye(n, dtype=v.dtype, device=v.device)
        if self._is_null(theta):
            return eye / v[..., None, None]
        U, c, d = self._eigen(v, theta)
        if U.shape[1] == n:
            return torch.einsum("sk,gjk,tk->gjst", U, 1.0 / c, U)
        coef_res = (1.0 / c - 1.0 / d[..., None]).clamp(-1e6, 1e6)
        return eye / d[..., None, None] + torch.einsum("sk,gjk,tk->gjst", U, coef_res, U)

    def hessian(self, W: Tensor, v: Tensor, theta: Tensor) -> Tensor:
        """Dense ``H = blockdiag_j(Sigma_j^-1) + W`` ``(G, nq, nq)``, isoform-major."""
        G, n, q, _ = W.shape
        S = self.sigma_inv(v, theta).expand(G, q, n, n)
        eye_q = torch.eye(q, dtype=W.dtype, device=W.device)
        H = torch.einsum("gjst,jk->gjskt", S, eye_q)
        H = H + torch.einsum("gsjk,st->gjskt", W, torch.eye(n, dtype=W.dtype, device=W.device))
        return H.reshape(G, n * q, n * q)

    def solve_logdet(self, W: Tensor, rhs: Tensor, v: Tensor, theta: Tensor):
        G, n, q, _ = W.shape
        L = torch.linalg.cholesky(self.hessian(W, v, theta))
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        batched = rhs.dim() == 4
        R = rhs.shape[1] if batched else 1
        b = rhs.reshape(G, R, n, q).permute(0, 3, 2, 1).reshape(G, q * n, R)
        x = torch.cholesky_solve(b, L).reshape(G, q, n, R).permute(0, 3, 2, 1)
        return (x if batched else x[:, 0]), logdet

    def solve(self, W: Tensor, rhs: Tensor, v: Tensor, theta: Tensor) -> Tensor:
        return self.solve_logdet(W, rhs, v, theta)[0]

    def logdet(self, W: Tensor, v: Tensor, theta: Tensor) -> Tensor:
        L = torch.linalg.cholesky(self.hessian(W, v, theta))
        return 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)

