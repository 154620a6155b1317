"""Spatial covariance kernels: the standardised CAR kernel of a spot graph and the identity.

The spatial kernel ``K`` is the covariance of a conditional autoregressive (CAR) field on a graph
of spots, rescaled to unit marginal variance. Its inverse is sparse, which is what makes exact
computations possible at any number of spots:

* ``M = I - rho D^-1/2 A D^-1/2`` (CAR precision, ``d_s = max(sum_t A_st, 1e-12)``),
* ``S = diag(M^-1)`` (clipped at ``1e-12``),
* ``K = S^-1/2 M^-1 S^-1/2`` and ``K^-1 = S^1/2 M S^1/2`` (sparse, pattern of ``A`` plus diagonal).

Up to :data:`DENSE_THRESHOLD` spots ``K`` is held densely with its full eigendecomposition; above
it nothing ``n x n`` is ever formed: ``diag(M^-1)`` comes from a sparse factorisation and the
leading eigenpairs from a Lanczos solver whose mat-vec is a sparse triangular solve.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from splisosm.spatial.car import (
    DIAG_FLOOR,
    canonical_signs,
    car_precision,
    car_precision_factor,
    center,
    check_rho,
    sparse_inverse_diagonal,
    splu,
)
from splisosm.spatial.graph import as_csr, mutual_knn_adjacency

__all__ = ["DENSE_THRESHOLD", "IdentityKernel", "SpatialCovKernel", "null_eigenpairs"]

DENSE_THRESHOLD = 5000
"""Largest number of spots for which the kernel is held as a dense matrix."""

_SOLVE_BLOCK = 256  # right-hand sides per sparse-LU solve when probing the inverse column by column


def null_eigenpairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 placeholder eigenpairs for the null model: eigenvalue 1, constant unit eigenvector.

    Returns
    -------
    evals
        ``(1,)`` float64 tensor ``[1.0]``.
    evecs
        ``(n, 1)`` float64 tensor with every entry ``1 / sqrt(n)``.
    """
    if n < 1:
        raise ValueError(f"`n` must be positive, got {n}")
    return (
        torch.ones(1, dtype=torch.float64),
        torch.full((n, 1), 1.0 / math.sqrt(n), dtype=torch.float64),
    )


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


class _KernelBase:
    """Shared API of the kernels; subclasses provide ``_apply``, ``_compute_eigenpairs`` et al."""

    n_spots: int
    centering: bool

    def __init__(self, n_spots: int, centering: bool) -> None:
        self.n_spots = int(n_spots)
        self.centering = bool(centering)
        self._eig_cache: tuple[np.ndarray, np.ndarray] | None = None  # descending, float64
        self.K_eigvals: torch.Tensor | None = None
        self.K_eigvecs: torch.Tensor | None = None
        self.Q: torch.Tensor | None = None  # factor V diag(sqrt(lambda)) over positive eigenvalues

    # ---- to be provided by subclasses ----------------------------------------------------
    def _apply(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """``K @ x`` for a float64 ``(n, p)`` array."""
        raise NotImplementedError

    def _compute_eigenpairs(self, rank: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        """Leading ``rank`` eigenpairs, descending."""
        raise NotImplementedError

    @property
    def is_dense(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- eigenpairs ----------------------------------------------------------------------
    def _check_rank(self, rank: int | None) -> int:
        if rank is None:
            if not self.is_dense:
                raise ValueError(
                    f"a full eigendecomposition of the {self.n_spots}-spot kernel is not computed "
                    "in implicit mode (n > DENSE_THRESHOLD); request a rank, or use "
                    "sparse_precision() for exact computations"
                )
            return self.n_spots
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"`rank` must be a positive integer or None, got {rank!r}")
        return min(int(rank), self.n_spots)

    def eigenpairs(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Leading eigenpairs of the kernel.

        Parameters
        ----------
        rank
            Number of leading eigenpairs (clipped to ``n``); ``None`` for all of them (dense mode
            only: in implicit mode this raises ``ValueError``).

        Returns
        -------
        evals
            ``(r,)`` float64 tensor, descending.
        evecs
            ``(n, r)`` float64 tensor with orthonormal columns, column ``i`` belonging to
            ``evals[i]``.
        """
        r = self._check_rank(rank)
        if self._eig_cache is None or self._eig_cache[0].shape[0] < r:
            evals, evecs = self._compute_eigenpairs(r)
            self._eig_cache = (evals, canonical_signs(evecs))
        evals, evecs = self._eig_cache
        # copies: callers may modify the tensors in place without touching the cache
        return torch.from_numpy(evals[:r].copy()), torch.from_numpy(evecs[:, :r].copy())

    def eigenvalues(self, k: int | None = None) -> torch.Tensor:
        """The ``k`` largest eigenvalues (all of them for ``None``; dense mode), descending.

        The eigenvectors come with them, so ``K_eigvecs`` and ``Q`` are set as by
        :meth:`eigendecomposition` (scripts written for splisosm 1.2.0 read them after this call).
        """
        return self.eigendecomposition(k)[0]

    def eigendecomposition(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigendecomposition (full by default), setting ``K_eigvals``, ``K_eigvecs`` and ``Q``.

        ``Q = V diag(sqrt(lambda))`` over the positive eigenvalues, so ``Q Q^T`` is the kernel (or
        its best rank-``r`` approximation).
        """
        evals, evecs = self.eigenpairs(rank)
        self.K_eigvals, self.K_eigvecs = evals, evecs
        pos = evals > 0
        self.Q = evecs[:, pos] * torch.sqrt(evals[pos])
        return evals, evecs

    # ---- products ------------------------------------------------------------------------
    def _as_array(self, x: Any) -> tuple[np.ndarray, bool]:
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim not in (1, 2) or arr.shape[0] != self.n_spots:
            raise ValueError(
                f"expected an ({self.n_spots},) or ({self.n_spots}, p) input, got {arr.shape}"
            )
        return (arr[:, None], True) if arr.ndim == 1 else (arr, False)

    def Kx(self, x: Any) -> torch.Tensor:
        """Exact product ``K x`` for ``x`` of shape ``(n,)`` or ``(n, p)`` (float64 tensor)."""
        arr, vec = self._as_array(x)
        out = self._apply(arr)
        return torch.from_numpy(out[:, 0] if vec else out)

    def xtKx_exact(self, x: Any) -> torch.Tensor:
        """Exact quadratic form ``x^T K x``: a scalar for a vector, ``(p, p)`` for a matrix."""
        arr, vec = self._as_array(x)
        out = arr.T @ self._apply(arr)
        return torch.tensor(out[0, 0]) if vec else torch.from_numpy(out)

    def xtKx_approx(self, x: Any, k: int) -> torch.Tensor:
        """``x^T K_k x`` with ``K_k`` the rank-``k`` truncation of the eigendecomposition."""
        arr, vec = self._as_array(x)
        evals, evecs = self.eigenpairs(k)
        proj = evecs.numpy().T @ arr
        out = proj.T @ (evals.numpy()[:, None] * proj)
        return torch.tensor(out[0, 0]) if vec else torch.from_numpy(out)

    def xtKx(self, x: Any) -> torch.Tensor:
        """``x^T K x``, through the factor ``Q`` when :meth:`eigendecomposition` has set it."""
        if self.Q is None:
            return self.xtKx_exact(x)
        arr, vec = self._as_array(x)
        proj = self.Q.numpy().T @ arr
        out = proj.T @ proj
        return torch.tensor(out[0, 0]) if vec else torch.from_numpy(out)


class SpatialCovKernel(_KernelBase):
    """Standardised CAR covariance of a spot graph (see the module docstring for the maths).

    Parameters
    ----------
    coords
        ``(n, d)`` spot coordinates; the graph is their mutual ``k_neighbors``-NN graph.
    adj_matrix
        ``(n, n)`` adjacency used as given (weights kept). Non-symmetric input is replaced by
        ``(A + A^T) / 2`` with a ``RuntimeWarning``; a dense-ish one (``nnz > 0.1 n^2``) warns.
    k_neighbors
        Neighbours of the k-NN graph (ignored with ``adj_matrix``).
    rho
        Spatial autocorrelation of the CAR model, finite with ``0 <= rho < 1``.
    standardize_cov
        Rescale to unit marginal variance (``diag(K) = 1``). Without it ``K = M^-1``.
    centering
        Double-centre the kernel, ``H K H`` with ``H = I - 11^T/n``. The centred kernel is singular,
        so :meth:`sparse_precision` is then unavailable.
    dense_threshold
        Largest ``n`` held densely; defaults to the module's :data:`DENSE_THRESHOLD` (read at
        construction, so tests can lower it).

    Attributes
    ----------
    n_spots, rho, standardize_cov, centering
        As given / derived.
    adjacency
        The ``(n, n)`` CSR adjacency the kernel is built from (k-NN graph or symmetrised input).
    K_sp
        Dense ``(n, n)`` float64 kernel tensor in dense mode, ``None`` in implicit mode.
    K_eigvals, K_eigvecs, Q
        Set by :meth:`eigendecomposition` (``Q = V diag(sqrt(lambda))``); ``None`` before.

    Notes
    -----
    Exactly one of ``coords`` / ``adj_matrix`` must be given (the argument names of splisosm
    1.2.0). The dense kernel and its eigenpairs are float64 (the 1.2.0 reference stores float32;
    the difference is round-off).
    """

    def __init__(
        self,
        coords: Any = None,
        adj_matrix: Any = None,
        *,
        k_neighbors: int = 4,
        rho: float = 0.99,
        standardize_cov: bool = True,
        centering: bool = False,
        dense_threshold: int | None = None,
    ) -> None:
        if (coords is None) == (adj_matrix is None):
            raise ValueError("exactly one of `coords` and `adj_matrix` must be given")
        self.rho = check_rho(rho)
        if coords is not None:
            if isinstance(coords, torch.Tensor):
                coords = coords.detach().cpu().numpy()
            adj = mutual_knn_adjacency(np.asarray(coords, dtype=np.float64), k_neighbors)
        else:
            adj = as_csr(adj_matrix)
            if (adj != adj.T).nnz > 0:
                warnings.warn(
                    "adjacency matrix is not symmetric; symmetrising it as (A + A^T) / 2",
                    RuntimeWarning,
                    stacklevel=2,
                )
                adj = ((adj + adj.T) * 0.5).tocsr()
                adj.sort_indices()
            n = adj.shape[0]
            if adj.nnz > 0.1 * n * n:
                warnings.warn(
                    f"adjacency matrix is dense ({adj.nnz} non-zeros for {n} spots, more than "
                    "10%); the CAR kernel of such a graph is unusual and its factorisation costly",
                    RuntimeWarning,
                    stacklevel=2,
                )
        super().__init__(adj.shape[0], centering)
        self.k_neighbors = int(k_neighbors)
        self.standardize_cov = bool(standardize_cov)
        self.adjacency = adj
        self.dense_threshold = DENSE_THRESHOLD if dense_threshold is None else int(dense_threshold)
        self._M = car_precision(adj, self.rho)
        self._lu: spla.SuperLU | None = None
        self.K_sp: torch.Tensor | None = None
        if self.is_dense:
            self._K, self._scale = self._dense_kernel()
            self.K_sp = torch.from_numpy(self._K)
        else:
            self._K = None
            self._scale = self._implicit_scale()

    @classmethod
    def from_coordinates(
        cls,
        coords: Any,
        k_neighbors: int = 4,
        rho: float = 0.99,
        standardize_cov: bool = True,
        centering: bool = False,
    ) -> SpatialCovKernel:
        """Kernel of the mutual k-NN graph of ``coords``."""
        return cls(
            coords,
            k_neighbors=k_neighbors,
            rho=rho,
            standardize_cov=standardize_cov,
            centering=centering,
        )

    @classmethod
    def from_adjacency(
        cls,
        adj_matrix: Any,
        rho: float = 0.99,
        standardize_cov: bool = True,
        centering: bool = False,
    ) -> SpatialCovKernel:
        """Kernel of a given adjacency matrix."""
        return cls(adj_matrix=adj_matrix, rho=rho, standardize_cov=standardize_cov,
                   centering=centering)

    @property
    def is_dense(self) -> bool:
        """Whether the kernel is held as a dense matrix (``n <= dense_threshold``)."""
        return self.n_spots <= self.dense_threshold

    # ---- construction --------------------------------------------------------------------
    def _dense_kernel(self) -> tuple[np.ndarray, np.ndarray]:
        """Dense ``K`` by a Cholesky inverse of ``M``, and the scale ``s = diag(M^-1)``."""
        chol, info = sla.lapack.dpotrf(self._M.toarray(), lower=1)
        if info != 0:
            raise ValueError("CAR precision is not positive definite (check the adjacency weights)")
        inv, info = sla.lapack.dpotri(chol, lower=1)
        if info != 0:  # pragma: no cover - potrf succeeded, so potri cannot fail
            raise ValueError("inverting the CAR precision failed")
        kmat = np.tril(inv) + np.tril(inv, -1).T
        scale = np.ones(self.n_spots)
        if self.standardize_cov:
            scale = np.maximum(np.diag(kmat).copy(), DIAG_FLOOR)
            inv_sqrt = 1.0 / np.sqrt(scale)
            kmat *= inv_sqrt[:, None]
            kmat *= inv_sqrt[None, :]
        if self.centering:
            kmat = center(center(kmat).T)
        kmat = 0.5 * (kmat + kmat.T)
        return kmat, scale

    def _implicit_scale(self) -> np.ndarray:
        if not self.standardize_cov:
            return np.ones(self.n_spots)
        return np.maximum(sparse_inverse_diagonal(self._M), DIAG_FLOOR)

    def _factor(self) -> spla.SuperLU:
        """Sparse LU of the CAR precision ``M`` (computed on first use, then kept)."""
        if self._lu is None:
            self._lu = splu(self._M)
        return self._lu

    # ---- precision -----------------------------------------------------------------------
    def sparse_precision(self) -> sp.csr_matrix:
        """Sparse inverse of the (uncentred) kernel, ``S^1/2 M S^1/2``.

        Returns
        -------
        scipy.sparse.csr_matrix
            ``(n, n)`` float64, symmetric, sorted indices; the pattern of the graph plus diagonal.
        """
        if self.centering:
            raise ValueError("the centred kernel H K H is singular and has no precision matrix")
        half = sp.diags(np.sqrt(self._scale))
        prec = (half @ self._M @ half).tocsr()
        prec.sort_indices()
        return prec

    @property
    def inv_cov(self) -> sp.csr_matrix:
        """The precision ``K^-1`` as a sparse matrix (see :meth:`sparse_precision`)."""
        return self.sparse_precision()

    # ---- products and eigenpairs ---------------------------------------------------------
    def _apply(self, x: np.ndarray) -> np.ndarray:
        if self._K is not None:
            return self._K @ x
        if not self.centering:
            return self._uncentred_apply(x)
        return center(self._uncentred_apply(center(x)))

    def _uncentred_apply(self, x: np.ndarray) -> np.ndarray:
        """``S^-1/2 M^-1 S^-1/2 x`` by sparse LU solves (implicit mode)."""
        inv_sqrt = 1.0 / np.sqrt(self._scale)[:, None]
        return inv_sqrt * self._factor().solve(np.ascontiguousarray(inv_sqrt * x))

    def _compute_eigenpairs(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        if self._K is not None:
            evals, evecs = sla.eigh(self._K, driver="evd")
            return evals[::-1].copy(), evecs[:, ::-1].copy()
        n = self.n_spots
        if rank >= n - 1:
            raise ValueError(
                f"rank {rank} is too large for the iterative eigensolver on {n} spots; use a "
                "smaller rank or sparse_precision() for exact computations"
            )
        op = spla.LinearOperator((n, n), matvec=lambda v: self._apply(v.reshape(n, 1))[:, 0],
                                 matmat=self._apply, dtype=np.float64)
        v0 = np.random.default_rng(0).standard_normal(n)
        evals, evecs = spla.eigsh(op, k=rank, which="LA", v0=v0)
        order = np.argsort(evals)[::-1]
        return evals[order], evecs[:, order]

    def sample(self, n_samples: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """Independent draws from ``N(0, K)``.

        With ``M = B B^T`` (:func:`car_precision_factor`) and ``z ~ N(0, I)``,
        ``u = S^-1/2 M^-1 B z`` has covariance ``S^-1/2 M^-1 S^-1/2 = K``; this needs one sparse
        solve per draw and no dense ``n x n`` matrix at any ``n``.

        Parameters
        ----------
        n_samples
            Number of draws.
        rng
            Generator or seed for ``numpy.random.default_rng``.

        Returns
        -------
        numpy.ndarray
            ``(n, n_samples)`` float64, one draw per column (centred when ``centering``).
        """
        rng = np.random.default_rng(rng)
        factor = car_precision_factor(self.adjacency, self.rho)
        noise = factor @ rng.standard_normal((factor.shape[1], int(n_samples)))
        draws = self._uncentred_apply(noise * np.sqrt(self._scale)[:, None])
        return center(draws) if self.centering else draws

    # ---- summaries -----------------------------------------------------------------------
    def realization(self) -> torch.Tensor:
        """Dense ``(n, n)`` kernel.

        In implicit mode: ``Q Q^T`` when :meth:`eigendecomposition` has set the factor ``Q``
        (a low-rank approximation), otherwise the exact inverse by LU solves with a
        ``RuntimeWarning`` (O(n^2) memory).
        """
        if self.K_sp is not None:
            return self.K_sp
        if self.Q is not None:
            return self.Q @ self.Q.T
        warnings.warn(
            f"forming the dense {self.n_spots} x {self.n_spots} kernel by sparse LU inversion",
            RuntimeWarning,
            stacklevel=2,
        )
        return torch.from_numpy(self._apply(np.eye(self.n_spots)))

    def _diag(self) -> np.ndarray:
        if self._K is not None:
            return np.diag(self._K).copy()
        n = self.n_spots
        diag = np.ones(n) if self.standardize_cov else sparse_inverse_diagonal(self._M)
        if self.centering:
            # diag(H K H) = diag(K) - 2 (K 1) / n + 1^T K 1 / n^2
            k1 = self._uncentred_apply(np.ones((n, 1)))[:, 0]
            diag = diag - 2.0 * k1 / n + k1.sum() / n**2
        return diag

    def trace(self) -> float:
        """``tr(K)`` (``n`` for the standardised, uncentred kernel)."""
        return float(self._diag().sum())

    def square_trace(self) -> float:
        """``tr(K^2) = ||K||_F^2`` (implicit mode: exact, by blocked solves, O(n) of them)."""
        if self._K is not None:
            return float(np.sum(self._K * self._K))
        total = 0.0
        for start in range(0, self.n_spots, _SOLVE_BLOCK):
            stop = min(start + _SOLVE_BLOCK, self.n_spots)
            block = np.zeros((self.n_spots, stop - start))
            block[np.arange(start, stop), np.arange(stop - start)] = 1.0
            total += float(np.sum(self._apply(block) ** 2))
        return total

    def __repr__(self) -> str:
        mode = "dense" if self.is_dense else "implicit"
        return (
            f"SpatialCovKernel(n_spots={self.n_spots}, rho={self.rho}, mode={mode}, "
            f"standardize_cov={self.standardize_cov}, centering={self.centering})"
        )


class IdentityKernel(_KernelBase):
    """Identity covariance ``K = I`` (``H`` when centred): every eigenvalue is 1.

    Parameters
    ----------
    n
        Number of spots.
    centering
        Use ``H = I - 11^T/n`` instead (eigenvalues 1, ..., 1, 0).
    """

    rho = None

    def __init__(self, n: int, centering: bool = False) -> None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"`n` must be a positive integer, got {n!r}")
        super().__init__(n, centering)

    @property
    def is_dense(self) -> bool:
        return True

    @property
    def K_sp(self) -> torch.Tensor:
        """Dense ``(n, n)`` float64 identity (or centring matrix)."""
        return torch.from_numpy(self._apply(np.eye(self.n_spots)))

    def _apply(self, x: np.ndarray) -> np.ndarray:
        return center(x) if self.centering else x.copy()

    def _compute_eigenpairs(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.n_spots
        if not self.centering:
            return np.ones(rank), np.eye(n, rank)
        # orthonormal complement of the constant vector: QR of [1, e_1, ..., e_{n-1}]
        basis, _ = np.linalg.qr(np.hstack([np.ones((n, 1)), np.eye(n, n - 1)]))
        evecs = np.hstack([basis[:, 1:], basis[:, :1]])
        evals = np.r_[np.ones(n - 1), 0.0]
        return evals, evecs

    def sparse_precision(self) -> sp.csr_matrix:
        """Identity precision (``ValueError`` when centred: ``H`` is singular)."""
        if self.centering:
            raise ValueError("the centred identity H is singular and has no precision matrix")
        return sp.identity(self.n_spots, format="csr", dtype=np.float64)

    @property
    def inv_cov(self) -> sp.csr_matrix:
        """The precision as a sparse matrix (see :meth:`sparse_precision`)."""
        return self.sparse_precision()

    def realization(self) -> torch.Tensor:
        """Dense kernel (identity or ``H``)."""
        return self.K_sp

    def trace(self) -> float:
        """``n`` (``n - 1`` when centred)."""
        return float(self.n_spots - int(self.centering))

    def square_trace(self) -> float:
        """``tr(K^2)``, equal to :meth:`trace` for a projection."""
        return self.trace()

    def __repr__(self) -> str:
        return f"IdentityKernel(n_spots={self.n_spots}, centering={self.centering})"
