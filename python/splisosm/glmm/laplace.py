"""The Laplace system of the GLMM random effects, behind one interface for every kernel form.

Per gene and isoform column ``j`` the random effect ``nu_j`` has prior covariance
``Sigma_j = v_j (theta_j K + (1 - theta_j) I)``; with the multinomial curvature ``W`` the
negative Hessian in ``nu`` is ``H = blockdiag_j(Sigma_j^-1) + W``.
:class:`LaplaceSystem` provides the prior terms of the joint likelihood, Newton solves with ``H``
and ``log det H`` (the term of the Laplace marginal ``l_J - 1/2 log det H``), choosing the cheapest
exact route for the kernel it was given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from splisosm.glmm._sparse_prior import ShiftedTraces, shifted_traces, sparse_prior_terms
from splisosm.ops._linalg import LOW_RANK_CLIP, checked_cholesky
from splisosm.ops._native import has_native_kernel
from splisosm.ops.laplace import (
    laplace_logdet_eig,
    laplace_lowrank,
    laplace_solve_eig,
    laplace_sparse,
    laplace_sparse_logdet,
    sparse_shifted_solve,
)

if TYPE_CHECKING:  # pragma: no cover
    import scipy.sparse

__all__ = ["LaplaceSystem", "NULL_THETA", "SYMMETRY_RTOL", "symmetric_precision"]

#: Below this spatial proportion, for every gene and column, the prior is taken as exactly ``v I``
#: (the identity fast path of null models, with the threshold splisosm 1.2.0 uses).
NULL_THETA = 1e-10
_CPU = torch.device("cpu")
# Low-rank solves alone use CG up to this theta (cheaper than the direct factorisation there);
# above it CG iterations grow quickly while the direct cost does not change.
CG_THETA_MAX = 0.9


class LaplaceSystem:
    """Prior terms, Newton solves and log-determinants of ``H = I_q (x) Sigma^-1 + W``.

    Parameters
    ----------
    n_spots
        Number of spots ``n``.
    evals, evecs
        Kernel eigenpairs ``(r,)`` and ``(n, r)``; ``r == n`` is the exact kernel, ``r < n`` the
        low-rank model (covariance ``V diag(c) V^T + d (I - V V^T)``, residual eigenvalue
        ``d = v (1 - theta)`` off ``span(V)``).
    precision
        Sparse kernel precision ``K^-1`` (any scipy sparse matrix, converted to float64 CSR).
    identity
        ``K = I`` (null-model kernel): every prior is ``v I``.

    Notes
    -----
    Routes: ``identity`` (and any call where every ``theta < NULL_THETA``) uses the per-spot
    closed form; a low-rank eigenbasis uses the direct low-rank op (determinant lemma and
    Woodbury from one ``rq x rq`` factor), except for a solve alone with every
    ``theta <= CG_THETA_MAX`` (CG); a full-rank eigenbasis alone uses CG for solves;
    a full-rank eigenbasis together with ``precision`` solves and factors through the sparse
    precision (exact and fastest) and uses the eigenpairs for :meth:`prior_terms`; ``precision``
    alone uses the sparse op everywhere. Inputs may be float32 and on any device: the ops run in
    float64, on the input's GPU for the eigenbasis and identity routes when splisosm was built
    with its CUDA kernels, otherwise (and on the sparse route) on the CPU; results come back in the
    dtype and device of the input.
    :meth:`prior_terms` and :meth:`logdet` are differentiable (first derivatives; the eigenbasis
    and identity forms to any order); :meth:`solve` and :meth:`solve_logdet` are not (inputs are
    detached).

    Attributes
    ----------
    cg_tol, cg_max_iter
        Relative residual and iteration cap of the CG solves of the full-rank eigenbasis route
        (``None``: ``max(100, 2 n q)``).
    """

    cg_tol: float = 1e-10
    cg_max_iter: int | None = None

    def __init__(
        self,
        n_spots: int,
        *,
        evals: Tensor | None = None,
        evecs: Tensor | None = None,
        precision: scipy.sparse.spmatrix | None = None,
        identity: bool = False,
    ) -> None:
        if int(n_spots) < 1:
            raise ValueError(f"`n_spots` must be >= 1, got {n_spots}")
        self.n = int(n_spots)
        self.identity = bool(identity)
        self._evals: Tensor | None = None
        self._evecs: Tensor | None = None
        self._csr: tuple[Tensor, Tensor, Tensor] | None = None
        self._logdet_precision: float | None = None
        self._traces: ShiftedTraces | None = None
        # GPU copies of the eigenpairs by (device, dtype), made on first use
        self._eig_copies: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        if (evals is None) != (evecs is None):
            raise ValueError("`evals` and `evecs` must be given together")
        if evecs is not None:
            evals = torch.as_tensor(evals)
            evecs = torch.as_tensor(evecs)
            if evecs.dim() != 2 or evecs.shape[0] != self.n or not 1 <= evecs.shape[1] <= self.n:
                raise ValueError(
                    f"`evecs` must have shape (n_spots, r) with 1 <= r <= {self.n}, "
                    f"got {tuple(evecs.shape)}"
                )
            if tuple(evals.shape) != (evecs.shape[1],):
                raise ValueError(
                    f"`evals` must have shape ({evecs.shape[1]},) to match `evecs`, "
                    f"got {tuple(evals.shape)}"
                )
            self._evals = evals.detach().to(_CPU, torch.float64)
            self._evecs = evecs.detach().to(_CPU, torch.float64).contiguous()
        if precision is not None:
            self._csr = _csr_tensors(precision, self.n)
        if not identity and evecs is None and precision is None:
            raise ValueError("give eigenpairs (`evals`, `evecs`), a `precision`, or identity=True")

    @property
    def rank(self) -> int | None:
        """Kernel eigenpairs ``r`` (``n`` for identity); ``None`` with a precision only."""
        if self.identity:
            return self.n
        return None if self._evecs is None else self._evecs.shape[1]

    @property
    def route(self) -> str:
        """Route of :meth:`solve` / :meth:`logdet` when ``theta`` is not null: ``identity``,
        ``eigen`` or ``sparse``."""
        if self.identity:
            return "identity"
        if self._csr is not None and (self.rank is None or self.rank == self.n):
            return "sparse"
        return "eigen"

    # ------------------------------------------------------------------ prior terms
    def prior_terms(
        self, nu: Tensor, v: Tensor, theta: Tensor, with_precision: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Quadratic form, log-determinant and precision product of the prior.

        Parameters
        ----------
        nu
            Random effects ``(G, n, q)``.
        v, theta
            Total variance and spatial proportion ``(G, q)``.
        with_precision
            Whether to return ``Sigma^-1 nu``. Gradient-descent fitters differentiate ``quad``
            instead and skip it: in the eigenbasis it costs one of the two products with ``V``.

        Returns
        -------
        quad
            ``(G,)`` ``sum_j nu_j^T Sigma_j^-1 nu_j``.
        logdet_sigma
            ``(G,)`` ``sum_j log det Sigma_j`` (low rank: ``sum_k log c_k + (n - r) log d``).
        prec_nu
            ``(G, n, q)`` ``Sigma^-1 nu``, or None when ``with_precision`` is False.

        Notes
        -----
        So ``sum_j l_MVN(nu_j) = -1/2 [n q log 2 pi + logdet_sigma + quad]``; the low-rank
        correction ``1/c - 1/d`` is not clipped here (only the Hessian ``H`` clips it, at
        ``LOW_RANK_CLIP``). ``theta == 1`` is accepted for a full-rank kernel
        (``Sigma = v K``), where a float32 sigmoid saturates. Differentiable by autograd; the
        precision-only form gives first derivatives of ``quad`` and ``logdet_sigma`` (from its
        sparse factorisations and their selected inverses) and a ``prec_nu`` without gradient.
        """
        self._check_params(nu, v, theta, "nu")
        self._check_ranges(v, theta, theta_max=1.0)  # no op below sees v and theta
        if self._is_null(theta):
            return _identity_prior(nu, v)
        if self._evecs is None:
            return self._sparse_prior(nu, v, theta)
        lam, V = self._eigenpairs(nu.device, nu.dtype)
        c = v[:, None, :] * (theta[:, None, :] * lam[None, :, None] + (1 - theta[:, None, :]))
        z = torch.einsum("sk,gsj->gkj", V, nu)  # (G, r, q)
        if self.rank == self.n:
            zc = z / c
            quad = (z * zc).sum((1, 2))
            logdet = torch.log(c).sum((1, 2))
            prec = torch.einsum("sk,gkj->gsj", V, zc) if with_precision else None
            return quad, logdet, prec
        d = v * (1 - theta)
        corr = 1 / c - 1 / d[:, None, :]
        quad = (nu * nu).sum(1).div(d).sum(1) + (corr * z * z).sum((1, 2))
        logdet = torch.log(c).sum((1, 2)) + (self.n - self.rank) * torch.log(d).sum(1)
        prec = (
            nu / d[:, None, :] + torch.einsum("sk,gkj->gsj", V, corr * z) if with_precision else None
        )
        return quad, logdet, prec

    def _sparse_prior(self, nu: Tensor, v: Tensor, theta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Sigma = (a Q)^-1 + tau^-1 I with a = 1/(v theta), tau = 1/(v (1 - theta)).
        v64, t64 = _sparse_params(v, theta)
        a, tau = 1 / (v64 * t64), 1 / (v64 * (1 - t64))
        nu64 = nu.to(_CPU, torch.float64)
        # tr (a Q + tau I)^-1 only where the derivatives in v or theta are wanted
        traced = torch.is_grad_enabled() and (a.requires_grad or tau.requires_grad)
        coef = self._trace_table().coefficients if traced else None
        quad, logdet, prec, _, _ = sparse_prior_terms(nu64, a, tau, *self._csr,
                                                      self._precision_logdet(), coef)
        return quad.to(nu.device, nu.dtype), logdet.to(nu.device, nu.dtype), \
            prec.to(nu.device, nu.dtype)

    def _trace_table(self) -> ShiftedTraces:
        if self._traces is None:
            self._traces = shifted_traces(self._csr)
        return self._traces

    def _precision_logdet(self) -> float:
        if self._logdet_precision is None:
            one = torch.ones(1, dtype=torch.float64)
            _, ld = sparse_shifted_solve(
                *self._csr, one, torch.zeros(1, dtype=torch.float64),
                torch.zeros(1, 0, self.n, dtype=torch.float64),
            )
            self._logdet_precision = float(ld[0])
        return self._logdet_precision

    # ------------------------------------------------------------------ Laplace system
    def solve(self, W: Tensor, rhs: Tensor, v: Tensor, theta: Tensor) -> Tensor:
        """``H^-1 rhs`` for ``rhs (G, n, q)`` or ``(G, R, n, q)`` (same shape and dtype back)."""
        return self._run(W, rhs, v, theta, want_solve=True, want_logdet=False)[0]

    def logdet(self, W: Tensor, v: Tensor, theta: Tensor) -> Tensor:
        """``log det H`` per gene ``(G,)`` in the dtype of ``W``.

        Differentiable in ``W``, ``v`` and ``theta`` when any of them requires a gradient: the
        sparse route through selected inversion of its factor, the low-rank route through the
        determinant lemma on ``rq x rq`` matrices, a full-rank eigenbasis without a precision
        through the ``nq x nq`` eigenbasis form of ``H`` (the prior is dense there anyway).
        """
        if torch.is_grad_enabled() and any(t.requires_grad for t in (W, v, theta)):
            return self._logdet_differentiable(W, v, theta)
        return self._run(W, None, v, theta, want_solve=False, want_logdet=True)[1]

    def _logdet_differentiable(self, W: Tensor, v: Tensor, theta: Tensor) -> Tensor:
        self._check_system(W, v, theta)
        # the identity and eigenbasis forms here are torch code, and the sparse op sees theta
        # only clamped into (0, 1)
        self._check_ranges(v, theta)
        work = self._work_device(W, theta)
        W64, v64, t64 = (x.to(work, torch.float64) for x in (W, v, theta))
        if self._is_null(theta):
            ld = _identity_system(W64, None, v64, True)[1]
        elif self.route == "sparse":
            v64, t64 = _sparse_params(v64, t64)
            ld = laplace_sparse_logdet(W64, *self._csr, v64, t64)
        else:
            ld = _eigen_logdet(W64, *self._eigenpairs(work, torch.float64), v64, t64)
        return ld.to(W.device, W.dtype)

    def solve_logdet(
        self, W: Tensor, rhs: Tensor, v: Tensor, theta: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:meth:`solve` and :meth:`logdet` together (one factorisation on the sparse route)."""
        return self._run(W, rhs, v, theta, want_solve=True, want_logdet=True)

    def _run(
        self,
        W: Tensor,
        rhs: Tensor | None,
        v: Tensor,
        theta: Tensor,
        *,
        want_solve: bool,
        want_logdet: bool,
    ) -> tuple[Tensor | None, Tensor | None]:
        self._check_system(W, v, theta)
        if rhs is not None and (
            not isinstance(rhs, Tensor) or rhs.dim() not in (3, 4) or rhs.shape[-2:] != W.shape[1:3]
        ):
            raise ValueError(
                f"`rhs` must be (G, n, q) or (G, R, n, q) matching `W` {tuple(W.shape)}, "
                f"got {getattr(rhs, 'shape', rhs)}"
            )
        null = self._is_null(theta)
        if null or self.route == "sparse":
            # the identity form calls no op, and the sparse op sees theta only clamped into
            # (0, 1); the eigenbasis ops check v and theta themselves
            self._check_ranges(v, theta)
        device = W.device
        work = self._work_device(W, theta)
        W64 = W.detach().to(work, torch.float64)
        v64 = v.detach().to(work, torch.float64)
        t64 = theta.detach().to(work, torch.float64)
        b64 = None if rhs is None else rhs.detach().to(work, torch.float64)
        if null:
            x, ld = _identity_system(W64, b64, v64, want_logdet)
        elif self.route == "sparse":
            x, ld = laplace_sparse(W64, b64, *self._csr, *_sparse_params(v64, t64))
        elif self.rank < self.n and (want_logdet or float(t64.max()) > CG_THETA_MAX):
            x, ld = laplace_lowrank(W64, b64, *self._eigenpairs(work, torch.float64), v64, t64)
        else:
            lam, V = self._eigenpairs(work, torch.float64)
            x = ld = None
            if want_solve:
                x = laplace_solve_eig(W64, b64, lam, V, v64, t64, tol=self.cg_tol,
                                      max_iter=self.cg_max_iter)
            if want_logdet:
                ld = laplace_logdet_eig(W64, lam, V, v64, t64)
        x = None if x is None else x.to(device, rhs.dtype)
        ld = None if ld is None else ld.to(device, W.dtype)
        return x, ld

    # ------------------------------------------------------------------ helpers
    def _work_device(self, W: Tensor, theta: Tensor) -> torch.device:
        """Where a Laplace computation runs: the input's GPU for the eigenbasis and identity
        routes when the CUDA kernels are built, else the CPU (the sparse route always: its
        factorisations are CPU code)."""
        on_gpu = W.device.type == "cuda" and has_native_kernel("laplace_solve_eig", W.device)
        if on_gpu and (self._is_null(theta) or self.route == "eigen"):
            return W.device
        return _CPU

    def _eigenpairs(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The kernel's eigenvalues and eigenvectors on ``device`` in ``dtype``. A GPU copy is
        made once and kept (a transfer per call would cost more than the call); a CPU copy in
        another dtype is made per call, so that many models sharing the eigenpairs do not each
        hold one."""
        key = (torch.device(device), dtype)
        if key[0].type == "cpu":
            return self._evals.to(dtype), self._evecs.to(dtype)
        if key not in self._eig_copies:
            self._eig_copies[key] = (self._evals.to(device, dtype),
                                     self._evecs.to(device, dtype).contiguous())
        return self._eig_copies[key]

    def _is_null(self, theta: Tensor) -> bool:
        return self.identity or bool((theta.detach() < NULL_THETA).all())

    def _check_system(self, W: Tensor, v: Tensor, theta: Tensor) -> None:
        if not isinstance(W, Tensor) or W.dim() != 4:
            raise ValueError(f"`W` must be a (G, n, q, q) tensor, got {getattr(W, 'shape', W)}")
        self._check_params(W[..., 0], v, theta, "W")

    def _check_params(self, x: Tensor, v: Tensor, theta: Tensor, name: str) -> None:
        """Shapes: ``x`` has the system's ``n`` spots in dimension 1 and ``v``, ``theta`` are
        ``(G, q)`` as ``x``."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != self.n:
            raise ValueError(
                f"`{name}` must have {self.n} spots in dimension 1, got {getattr(x, 'shape', x)}"
            )
        G, q = x.shape[0], x.shape[2]
        for pname, p in (("v", v), ("theta", theta)):
            if not isinstance(p, Tensor) or tuple(p.shape) != (G, q):
                raise ValueError(
                    f"`{pname}` must have shape (G, q) = {(G, q)}, got {getattr(p, 'shape', p)}"
                )

    def _check_ranges(self, v: Tensor, theta: Tensor, theta_max: float | None = None) -> None:
        """``v > 0`` and ``0 <= theta < 1``, where no op checks them (the ops check their own
        inputs); ``theta_max`` admits ``theta == 1`` (a float32 sigmoid saturates) where the
        formula still holds (full-rank prior terms)."""
        if not bool((v.detach() > 0).all()):
            raise ValueError("`v` (total variance) must be positive")
        t = theta.detach()
        closed = theta_max is not None and self.rank == self.n
        upper = t <= theta_max if closed else t < 1
        if not bool(((t >= 0) & upper).all()):
            raise ValueError(f"`theta` (spatial proportion) must satisfy 0 <= theta "
                             f"{'<=' if closed else '<'} 1")


#: Largest relative asymmetry ``max |P - P^T| / max |P|`` of a precision taken for round-off.
SYMMETRY_RTOL = 1e-8
#: Entries of a precision at most this fraction of its largest entry are dropped as round-off.
ROUNDOFF_DROP = 64 * float(np.finfo(np.float64).eps)


def symmetric_precision(precision: object, n: int, name: str = "precision"):
    """A sparse kernel precision as float64 CSR, symmetrised as ``(P + P^T) / 2``.

    A precision computed in floating point (for instance by inverting a dense kernel) is only
    symmetric up to round-off: mirrored entries may differ in their last bits, and an entry that
    rounds to exactly zero on one side may be stored (or not) on the other, depending on the
    BLAS kernels of the machine. Averaging with the transpose removes both, so the result and its
    sparsity pattern are exactly symmetric whatever the input's round-off; entries no larger
    than ``ROUNDOFF_DROP`` times the largest one are dropped, so the pattern does not depend on
    which tiny entries the machine happened to compute as exact zeros.

    Parameters
    ----------
    precision
        Any scipy sparse ``(n, n)`` matrix.
    n
        Expected number of rows and columns.
    name
        Argument name used in error messages.

    Raises
    ------
    ValueError
        If ``precision`` is not a scipy sparse ``(n, n)`` matrix of finite values, or if its
        asymmetry is more than round-off: ``max |P - P^T| > SYMMETRY_RTOL * max |P|``.
    """
    import scipy.sparse as sp

    if not sp.issparse(precision):
        raise ValueError(f"`{name}` must be a scipy sparse matrix, got {type(precision).__name__}")
    csr = sp.csr_matrix(precision, dtype=np.float64)
    if csr.shape != (n, n):
        raise ValueError(f"`{name}` must have shape ({n}, {n}), got {csr.shape}")
    if not np.all(np.isfinite(csr.data)):
        raise ValueError(f"`{name}` contains non-finite values")
    scale = float(abs(csr).max()) if csr.nnz else 0.0
    asymmetry = float(abs(csr - csr.T).max()) if csr.nnz else 0.0
    if asymmetry > SYMMETRY_RTOL * scale:
        raise ValueError(
            f"`{name}` must be symmetric: max |P - P^T| = {asymmetry:.3g} is more than "
            f"{SYMMETRY_RTOL:g} times its largest entry ({scale:.3g})"
        )
    sym = ((csr + csr.T) * 0.5).tocsr()
    # Entries at the round-off level of the largest one carry no information but would make the
    # sparsity pattern (hence the fill-reducing ordering) depend on the machine that computed it.
    sym.data[np.abs(sym.data) <= ROUNDOFF_DROP * scale] = 0.0
    sym.eliminate_zeros()
    sym.sort_indices()
    return sym


def _csr_tensors(precision: object, n: int) -> tuple[Tensor, Tensor, Tensor]:
    csr = symmetric_precision(precision, n)
    return (
        torch.from_numpy(csr.indptr.astype(np.int64)),
        torch.from_numpy(csr.indices.astype(np.int64)),
        torch.from_numpy(csr.data.copy()),
    )


def _sparse_params(v: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """float64 CPU ``v, theta`` with ``theta`` kept inside (0, 1), where the sparse split exists.

    A column with theta below ``NULL_THETA`` (others not) then gets an almost white prior, which
    differs from ``v I`` by ``O(NULL_THETA)``.
    """
    t = theta.to(_CPU, torch.float64).clamp(NULL_THETA, 1 - NULL_THETA)
    return v.to(_CPU, torch.float64), t


def _identity_prior(nu: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = nu.shape[1]
    prec = nu / v[:, None, :]
    return (nu * prec).sum((1, 2)), n * torch.log(v).sum(1), prec


def _identity_system(
    W: Tensor, rhs: Tensor | None, v: Tensor, want_logdet: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Per-spot closed form with ``Sigma_j = v_j I``: ``H_s = diag(1/v) + W_s``."""
    L = checked_cholesky(W + torch.diag_embed(1 / v)[:, None], "the Laplace system H")
    x = None
    if rhs is not None:
        b = rhs if rhs.dim() == 4 else rhs[:, None]
        x = torch.cholesky_solve(b[..., None], L[:, None]).squeeze(-1)
        x = x if rhs.dim() == 4 else x[:, 0]
    return x, (_logdet_chol(L) if want_logdet else None)


def _logdet_chol(L: Tensor) -> Tensor:
    """``log det`` of ``L L^T`` summed over all but the first (gene) dimension."""
    return 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).flatten(1).sum(1)


def _eigen_logdet(W: Tensor, lam: Tensor, V: Tensor, v: Tensor, theta: Tensor) -> Tensor:
    """Differentiable ``log det H`` of the eigenbasis form (float64 inputs).

    Low rank: ``H = A + U E U^T`` with per-spot ``A_s = diag(1/d) + W_s``, ``U = I_q (x) V`` and
    the clipped ``E = 1/c - 1/d``; with ``L L^T = U^T A^-1 U`` the determinant lemma gives
    ``log det A + log det(I + L^T E L)``. Full rank: ``V`` is orthogonal, so
    ``log det H = log det(diag(1/c) + U^T W U)``.
    """
    G, n, q, _ = W.shape
    r = V.shape[1]
    c = v[..., None] * (theta[..., None] * lam + (1 - theta[..., None]))  # (G, q, r)
    if r == n:
        B = torch.einsum("sk,gsij,sl->gikjl", V, W, V).reshape(G, q * n, q * n)
        B = B + torch.diag_embed((1 / c).reshape(G, q * n))
        return _logdet_chol(checked_cholesky(B, "the Laplace system H"))
    d = v * (1 - theta)
    E = (1 / c - 1 / d[..., None]).clamp(-LOW_RANK_CLIP, LOW_RANK_CLIP).reshape(G, q * r)
    LA = checked_cholesky(W + torch.diag_embed(1 / d)[:, None], "diag(1/d) + W_s")
    M = torch.einsum("sk,gsij,sl->gikjl", V, torch.cholesky_inverse(LA), V).reshape(G, q * r, q * r)
    LM = checked_cholesky(M, "U^T A^-1 U")
    S = torch.eye(q * r, dtype=W.dtype, device=W.device) + LM.transpose(1, 2) @ (E[..., None] * LM)
    return _logdet_chol(LA) + _logdet_chol(checked_cholesky(S, "the Laplace system H"))
