"""Laplace-system ops versus the dense float64 reference (times per gene).

Rook grids with a standardised CAR kernel (rho = 0.99), q = 2, N ~ Poisson(10), theta = 0.5,
v = 0.2. The dense reference runs on fewer genes and is scaled per gene. At n = 10,000 no dense
kernel is formed: the sparse form uses the exact precision, the low-rank form random orthonormal
eigenvectors of the same cost (r = 400). Each timing is the best of ``REPS`` runs, which
matters on a shared machine. Usage: ``python bench/bench_laplace.py [--threads T] [side ...]``.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import scipy.sparse as sp
import torch

from splisosm.ops import (
    laplace_logdet_eig,
    laplace_lowrank,
    laplace_solve_eig,
    laplace_sparse,
    sparse_inverse_diagonal,
)
from splisosm.ops import laplace_reference as ref

F64 = torch.float64
Q_COLS = 2


def car(side: int, rho: float = 0.99, dense: bool = True) -> dict:
    n = side * side
    idx = np.arange(n).reshape(side, side)
    pairs = [(idx[:-1, :], idx[1:, :]), (idx[:, :-1], idx[:, 1:])]
    rows = np.concatenate([np.concatenate([a.ravel(), b.ravel()]) for a, b in pairs])
    cols = np.concatenate([np.concatenate([b.ravel(), a.ravel()]) for a, b in pairs])
    A = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    deg = np.asarray(A.sum(1)).ravel()
    Dm = sp.diags(1 / np.sqrt(deg))
    M = sp.csr_matrix(sp.eye(n) - rho * Dm @ A @ Dm)
    M.sort_indices()
    t0 = time.perf_counter()
    s = sparse_inverse_diagonal(
        torch.from_numpy(M.indptr.astype(np.int64)),
        torch.from_numpy(M.indices.astype(np.int64)),
        torch.from_numpy(M.data),
    ).numpy()
    out = {"n": n, "t_invdiag": time.perf_counter() - t0}
    Q = sp.csr_matrix(sp.diags(np.sqrt(s)) @ M @ sp.diags(np.sqrt(s)))
    Q.sort_indices()
    out["csr"] = tuple(
        torch.from_numpy(a)
        for a in (Q.indptr.astype(np.int64), Q.indices.astype(np.int64), Q.data.copy())
    )
    if dense:
        K = np.linalg.inv(M.toarray()) / np.sqrt(np.outer(s, s))
        lam, V = np.linalg.eigh((K + K.T) / 2)
        out["evals"] = torch.from_numpy(lam[::-1].copy())
        out["evecs"] = torch.from_numpy(V[:, ::-1].copy())
    return out


def inputs(G: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    p = torch._sample_dirichlet(torch.ones(G, n, Q_COLS + 1, dtype=F64), generator=gen)
    N = torch.poisson(torch.full((G, n), 10.0, dtype=F64), generator=gen)
    W = N[..., None, None] * (torch.diag_embed(p) - p[..., :, None] * p[..., None, :])[
        ..., :Q_COLS, :Q_COLS
    ]
    rhs = torch.randn(G, 1, n, Q_COLS, dtype=F64, generator=gen)
    v = torch.full((G, Q_COLS), 0.2, dtype=F64)
    t = torch.full((G, Q_COLS), 0.5, dtype=F64)
    return W, rhs, v, t


REPS = 3


def per_gene(fn, G: int) -> float:
    """Best-of-``REPS`` wall time in ms per gene, after a warm-up (pattern analysis, pools)."""
    fn()
    best = math.inf
    for _ in range(REPS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / G * 1e3


def bench(side: int, G: int = 64, G_ref: int = 1) -> dict:
    n = side * side
    dense = n <= 2500
    ker = car(side, dense=dense)
    W, rhs, v, t = inputs(G, n)
    r = math.ceil(4 * math.sqrt(n)) if dense else 400
    if dense:
        lam, V = ker["evals"], ker["evecs"]
    else:
        V = torch.linalg.qr(torch.randn(n, r, dtype=F64))[0]
        lam = torch.linspace(20, 0.5, r, dtype=F64)
    low = (lam[:r], V[:, :r])
    res = {"n": n, "invdiag_s": ker["t_invdiag"]}
    Gs = G if dense else 8
    res["sparse_solve_logdet"] = per_gene(
        lambda: laplace_sparse(W[:Gs], rhs[:Gs], *ker["csr"], v[:Gs], t[:Gs]), Gs
    )
    res["sparse_logdet"] = per_gene(
        lambda: laplace_sparse(W[:Gs], None, *ker["csr"], v[:Gs], t[:Gs]), Gs
    )
    Gl = G if dense else 4
    res["lowrank_logdet"] = per_gene(lambda: laplace_logdet_eig(W[:Gl], *low, v[:Gl], t[:Gl]), Gl)
    res["lowrank_direct_solve_logdet"] = per_gene(
        lambda: laplace_lowrank(W[:Gl], rhs[:Gl], *low, v[:Gl], t[:Gl]), Gl
    )
    res["lowrank_cg_solve"] = per_gene(
        lambda: laplace_solve_eig(W[:Gl], rhs[:Gl], *low, v[:Gl], t[:Gl]), Gl
    )
    if dense:
        res["eig_full_solve"] = per_gene(lambda: laplace_solve_eig(W, rhs, lam, V, v, t), G)
        Gf = min(G, 8)
        res["eig_full_logdet"] = per_gene(
            lambda: laplace_logdet_eig(W[:Gf], lam, V, v[:Gf], t[:Gf]), Gf
        )
        sl = slice(0, G_ref)
        res["dense_ref_solve_logdet"] = per_gene(
            lambda: ref.laplace_solve_eig_reference(W[sl], rhs[sl], lam, V, v[sl], t[sl]), G_ref
        )
        res["dense_ref_logdet"] = per_gene(
            lambda: ref.laplace_logdet_eig_reference(W[sl], lam, V, v[sl], t[sl]), G_ref
        )
    return res


def main(sides: list[int]) -> None:
    print(f"threads={torch.get_num_threads()}  q={Q_COLS}  times in ms per gene")
    for side in sides:
        res = bench(side)
        print(", ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--threads"]:
        torch.set_num_threads(int(args[1]))
        args = args[2:]
    main([int(s) for s in args] or [30, 50, 100])
