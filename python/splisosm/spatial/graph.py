"""Spot graphs: the mutual k-nearest-neighbour graph of spot coordinates and its components."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import torch
from scipy.spatial import cKDTree

__all__ = ["connected_components", "mutual_knn_adjacency"]

_TIE_RTOL = 1e-9  # neighbour distances closer than this (relative) count as ties


def _sorted_neighbours(tree: cKDTree, coords: np.ndarray, kk: int) -> np.ndarray:
    """The ``kk`` nearest points of every point, ties in distance broken by smaller index.

    KD-tree queries order equidistant points arbitrarily, so a few extra neighbours are queried,
    re-sorted by (rounded distance, index), and rows whose tie group may extend beyond the queried
    set are resolved exactly with a radius query.
    """
    n = coords.shape[0]
    n_query = min(n, kk + 8)
    dist, idx = tree.query(coords, k=n_query)
    dist = np.asarray(dist, dtype=np.float64).reshape(n, n_query)
    idx = np.asarray(idx, dtype=np.int64).reshape(n, n_query)
    scale = max(float(dist[:, -1].max()), np.finfo(np.float64).tiny)
    tol = _TIE_RTOL * scale
    key = np.round(dist / tol)
    order = np.lexsort((idx, key), axis=-1)
    nbrs = np.take_along_axis(idx, order, axis=-1)[:, :kk].copy()
    if n_query < n:
        open_ties = np.flatnonzero(key[:, n_query - 1] == key[:, kk - 1])
        for i in open_ties:
            ball = tree.query_ball_point(coords[i], dist[i, kk - 1] + 2 * tol)
            cand = np.asarray(ball, dtype=np.int64)
            cand_key = np.round(np.linalg.norm(coords[cand] - coords[i], axis=1) / tol)
            nbrs[i] = cand[np.lexsort((cand, cand_key))][:kk]
    return nbrs


def mutual_knn_adjacency(coords: np.ndarray, k: int) -> sp.csr_matrix:
    """Binary mutual k-nearest-neighbour graph of a set of points.

    Every point's ``k + 1`` nearest points (Euclidean, itself included) are found; an edge
    ``{s, t}`` is kept iff each is among the other's neighbours. Self-loops are removed, then
    every point left without an edge gets a self-loop of weight 1 so it stays an isolated node.

    Parameters
    ----------
    coords
        ``(n, d)`` coordinates.
    k
        Number of neighbours (excluding the point itself), ``>= 1``.

    Returns
    -------
    scipy.sparse.csr_matrix
        Symmetric ``(n, n)`` float64 matrix of zeros and ones with sorted indices.

    Notes
    -----
    Equidistant neighbours are ranked by index (distances within a relative ``1e-9`` of the
    largest queried distance count as equal), so the graph is deterministic; on lattices whose
    degree differs from ``k`` other tie-breaking rules give other graphs.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2:
        raise ValueError(f"`coords` must be a 2-D (n, d) array, got shape {coords.shape}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}")
    if not np.all(np.isfinite(coords)):
        raise ValueError("`coords` contains non-finite values")
    n = coords.shape[0]
    if n == 0:
        raise ValueError("`coords` has no points")
    kk = min(int(k) + 1, n)
    nbrs = _sorted_neighbours(cKDTree(coords), coords, kk)
    rows = np.repeat(np.arange(n), kk)
    directed = sp.csr_matrix((np.ones(n * kk), (rows, nbrs.ravel())), shape=(n, n))
    adj = directed.multiply(directed.T).tocsr()
    adj.setdiag(0.0)
    adj.eliminate_zeros()
    isolated = np.diff(adj.indptr) == 0
    adj = (adj + sp.diags(isolated.astype(np.float64))).tocsr()
    adj.data[:] = 1.0
    adj.sort_indices()
    return adj


def connected_components(adj: Any) -> tuple[int, np.ndarray]:
    """Connected components of an undirected graph.

    Parameters
    ----------
    adj
        ``(n, n)`` adjacency (scipy sparse or dense); any non-zero entry is an edge.

    Returns
    -------
    n_components
        Number of components.
    labels
        ``(n,)`` int array, the component of every node.
    """
    n_comp, labels = csgraph.connected_components(sp.csr_matrix(adj), directed=False)
    return int(n_comp), labels


def as_csr(adj: Any) -> sp.csr_matrix:
    """Square float64 CSR copy of an adjacency given as scipy sparse, numpy or torch."""
    if isinstance(adj, torch.Tensor):
        adj = adj.to_dense().cpu().numpy() if adj.is_sparse else adj.detach().cpu().numpy()
    mat = sp.csr_matrix(adj, dtype=np.float64)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"adjacency must be a square matrix, got shape {mat.shape}")
    if not np.all(np.isfinite(mat.data)):
        raise ValueError("adjacency contains non-finite values")
    mat.sum_duplicates()
    mat.sort_indices()
    return mat
