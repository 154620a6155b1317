"""Inputs of the Laplace-system tests: CAR kernels on grids and multinomial curvature blocks."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

F64 = torch.float64


def rook_adjacency(nx: int, ny: int) -> sp.csr_matrix:
    """Rook-neighbour grid adjacency; an isolated spot gets a self-loop."""
    n = nx * ny
    idx = np.arange(n).reshape(nx, ny)
    pairs = [(idx[:-1, :], idx[1:, :]), (idx[:, :-1], idx[:, 1:])]
    rows = np.concatenate([np.concatenate([a.ravel(), b.ravel()]) for a, b in pairs])
    cols = np.concatenate([np.concatenate([b.ravel(), a.ravel()]) for a, b in pairs])
    A = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    isolated = np.asarray(A.sum(1)).ravel() == 0
    return (A + sp.diags(isolated.astype(float))).tocsr()


def csr_tensors(M: sp.spmatrix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M = sp.csr_matrix(M, dtype=np.float64)
    M.sum_duplicates()
    M.sort_indices()
    return (
        torch.from_numpy(M.indptr.astype(np.int64)),
        torch.from_numpy(M.indices.astype(np.int64)),
        torch.from_numpy(M.data.copy()),
    )


def car_kernel(nx: int, ny: int, rho: float = 0.9) -> dict:
    """Standardised CAR kernel K = S^-1/2 M^-1 S^-1/2 of a rook grid, its sparse precision
    Q = S^1/2 M S^1/2 and its eigenpairs (descending)."""
    A = rook_adjacency(nx, ny)
    n = A.shape[0]
    deg = np.maximum(np.asarray(A.sum(1)).ravel(), 1e-12)
    Dm = sp.diags(1 / np.sqrt(deg))
    M = (sp.eye(n) - rho * Dm @ A @ Dm).tocsr()
    Minv = np.linalg.inv(M.toarray())
    s = np.diag(Minv).copy()
    K = Minv / np.sqrt(np.outer(s, s))
    K = (K + K.T) / 2
    Q = sp.diags(np.sqrt(s)) @ M @ sp.diags(np.sqrt(s))
    lam, V = np.linalg.eigh(K)
    return {
        "n": n,
        "K": torch.from_numpy(K),
        "M": M,
        "Q": sp.csr_matrix(Q),
        "csr": csr_tensors(Q),
        "evals": torch.from_numpy(lam[::-1].copy()),
        "evecs": torch.from_numpy(V[:, ::-1].copy()),
    }


def random_W(G: int, n: int, q: int, gen: torch.Generator, zero_frac: float = 0.25) -> torch.Tensor:
    """Multinomial curvature blocks N (diag p - p p^T)[:q, :q] with Poisson totals; about
    `zero_frac` of the spots have no counts (W_s = 0)."""
    alpha = torch.ones(G, n, q + 1, dtype=F64)
    p = torch._sample_dirichlet(alpha, generator=gen)
    N = torch.poisson(torch.full((G, n), 8.0, dtype=F64), generator=gen)
    N = N * (torch.rand(G, n, dtype=F64, generator=gen) > zero_frac)
    if n > 1:
        N[:, 0] = 0.0  # at least one zero-count spot
    full = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    return N[..., None, None] * full[..., :q, :q]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
