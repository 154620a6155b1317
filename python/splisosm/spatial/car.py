"""The CAR precision of a spot graph, its sparse factor, and the sparse algebra the kernel uses."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

import splisosm.ops

__all__ = ["car_precision", "car_precision_factor"]

#: Floor of the graph degrees and of the kernel's marginal variances.
DIAG_FLOOR = 1e-12


def check_rho(rho: Any) -> float:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise ValueError(f"`rho` must be a real number in [0, 1), got {rho!r}")
    rho = float(rho)
    if not math.isfinite(rho) or not 0.0 <= rho < 1.0:
        raise ValueError(f"`rho` must be finite with 0 <= rho < 1, got {rho}")
    return rho


def car_precision(adj: sp.spmatrix, rho: float) -> sp.csr_matrix:
    """CAR precision ``M = I - rho D^-1/2 A D^-1/2`` with ``d_s = max(sum_t A_st, 1e-12)``.

    Parameters
    ----------
    adj
        Symmetric ``(n, n)`` sparse adjacency.
    rho
        Spatial autocorrelation, ``0 <= rho < 1``.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n, n)`` float64 precision with sorted indices.
    """
    adj = sp.csr_matrix(adj, dtype=np.float64)
    deg = np.maximum(np.asarray(adj.sum(axis=1)).ravel(), DIAG_FLOOR)
    inv_sqrt = sp.diags(1.0 / np.sqrt(deg))
    prec = (sp.identity(adj.shape[0], format="csr") - rho * (inv_sqrt @ adj @ inv_sqrt)).tocsr()
    prec.sum_duplicates()
    prec.sort_indices()
    return prec


def car_precision_factor(adj: sp.spmatrix, rho: float) -> sp.csr_matrix:
    """Sparse ``B`` with ``B B^T = M``, the CAR precision of :func:`car_precision`.

    ``I - D^-1/2 A D^-1/2 = D^-1/2 (D - A) D^-1/2`` and ``D - A = E E^T`` with ``E`` the weighted
    incidence matrix (one column ``sqrt(w_st) (e_s - e_t)`` per edge; self-loops cancel), so
    ``B = [diag(sqrt(c)), sqrt(rho) D^-1/2 E]`` with ``c_s = 1 - rho d_s^true / d_s`` (``1 - rho``
    except on spots without neighbours, where the degree floor makes ``c_s = 1``).

    Parameters
    ----------
    adj
        Symmetric ``(n, n)`` sparse adjacency with non-negative weights.
    rho
        Spatial autocorrelation, ``0 <= rho < 1``.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n, n + n_edges)`` float64 factor.
    """
    adj = sp.csr_matrix(adj, dtype=np.float64)
    if adj.nnz and adj.data.min() < 0:
        raise ValueError("the sparse precision factor needs non-negative adjacency weights")
    n = adj.shape[0]
    true_deg = np.asarray(adj.sum(axis=1)).ravel()
    deg = np.maximum(true_deg, DIAG_FLOOR)
    upper = sp.triu(adj, k=1).tocoo()
    n_edges = upper.nnz
    edge = np.arange(n_edges)
    weight = np.sqrt(upper.data)
    incidence = sp.csr_matrix(
        (np.r_[weight, -weight], (np.r_[upper.row, upper.col], np.r_[edge, edge])),
        shape=(n, n_edges),
    )
    diag_part = sp.diags(np.sqrt(1.0 - rho * true_deg / deg))
    edge_part = math.sqrt(rho) * (sp.diags(1.0 / np.sqrt(deg)) @ incidence)
    return sp.hstack([diag_part, edge_part], format="csr")


def canonical_signs(evecs: np.ndarray) -> np.ndarray:
    """Flip eigenvectors so the entry of largest magnitude is positive (deterministic output)."""
    if evecs.shape[1] == 0:
        return evecs
    pivot = np.abs(evecs).argmax(axis=0)
    signs = np.sign(evecs[pivot, np.arange(evecs.shape[1])])
    signs[signs == 0] = 1.0
    return evecs * signs


def center(x: np.ndarray) -> np.ndarray:
    """``H x`` with ``H = I - 11^T / n`` (columns of ``x`` centred)."""
    return x - x.mean(axis=0, keepdims=True)


def splu(mat: sp.spmatrix) -> spla.SuperLU:
    """Sparse LU with a symmetric fill-reducing ordering (the matrices here are SPD)."""
    return spla.splu(
        sp.csc_matrix(mat),
        permc_spec="MMD_AT_PLUS_A",
        diag_pivot_thresh=0.0,
        options={"SymmetricMode": True},
    )


def sparse_inverse_diagonal(mat: sp.csr_matrix) -> np.ndarray:
    """``diag(mat^-1)`` of an SPD sparse matrix by selected inversion of its sparse Cholesky factor
    (:func:`splisosm.ops.sparse_inverse_diagonal`; its dense reference without a native kernel)."""
    out = splisosm.ops.sparse_inverse_diagonal(
        torch.from_numpy(mat.indptr.astype(np.int64)),
        torch.from_numpy(mat.indices.astype(np.int64)),
        torch.from_numpy(mat.data.astype(np.float64)),
    )
    return np.asarray(out.detach().cpu().numpy(), dtype=np.float64)
