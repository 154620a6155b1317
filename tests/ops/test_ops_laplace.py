"""Laplace-system ops (eigenbasis and sparse routes) against dense float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from helpers.laplace_inputs import F64, car_kernel, csr_tensors, random_W, rel
from splisosm.ops import (
    laplace_logdet_eig,
    laplace_lowrank,
    laplace_solve_eig,
    laplace_sparse,
    laplace_sparse_logdet,
    laplace_sparse_logdet_grad,
    sparse_inverse_diagonal,
    sparse_shifted_solve,
    use_reference,
)
from splisosm.ops import laplace_reference as ref
from splisosm.ops._native import has_native_kernel

GRIDS = {1: (1, 1), 7: (7, 1), 50: (5, 10), 400: (20, 20)}
_kernels: dict[int, dict] = {}


def kernel(n: int) -> dict:
    if n not in _kernels:
        _kernels[n] = car_kernel(*GRIDS[n])
    return _kernels[n]


def variance(G: int, q: int, theta: float, shared: bool, gen: torch.Generator):
    cols = 1 if shared else q
    v = (0.2 + torch.rand(G, cols, dtype=F64, generator=gen)).expand(G, q).contiguous()
    jitter = 1 + 0.2 * (torch.rand(G, cols, dtype=F64, generator=gen) - 0.5)
    t = (theta * jitter).clamp(max=0.9995).expand(G, q).contiguous()
    return v, t


# ---------------------------------------------------------------------------------- accuracy
SMALL = [(1, 1), (1, 2), (7, 1), (7, 2), (7, 4), (50, 1), (50, 2), (50, 4)]
THETAS = [1e-3, 0.5, 0.999]
# n = 400 is the slow dense reference: per-isoform variances only (the harder case).
CASES = [(n, q, t, s) for n, q in SMALL for t in THETAS for s in (True, False)] + [
    (400, 2, t, False) for t in THETAS
]


@pytest.mark.parametrize("n,q,theta,shared", CASES)
def test_forms_match_dense_reference(n: int, q: int, theta: float, shared: bool) -> None:
    gen = torch.Generator().manual_seed(n * 100 + q * 10 + int(theta * 7) + shared)
    G, R = 3, 2
    ker = kernel(n)
    W = random_W(G, n, q, gen)
    rhs = torch.randn(G, R, n, q, dtype=F64, generator=gen)
    v, t = variance(G, q, theta, shared, gen)
    ranks = [n] if n == 1 else [n, max(1, math.ceil(n / 3))]
    for r in ranks:
        lam, V = ker["evals"][:r], ker["evecs"][:, :r]
        x = laplace_solve_eig(W, rhs, lam, V, v, t, tol=1e-13)
        ld = laplace_logdet_eig(W, lam, V, v, t)
        x_ref = ref.laplace_solve_eig_reference(W, rhs, lam, V, v, t)
        ld_ref = ref.laplace_logdet_eig_reference(W, lam, V, v, t)
        assert rel(x, x_ref) < 1e-8, f"eigen solve, rank {r}"
        assert rel(ld, ld_ref) < 1e-8, f"eigen logdet, rank {r}"
        if r < n:
            x_direct, ld_direct = laplace_lowrank(W, rhs, lam, V, v, t)
            assert rel(x_direct, x_ref) < 1e-8 and rel(ld_direct, ld_ref) < 1e-8
    xs, lds = laplace_sparse(W, rhs, *ker["csr"], v, t)
    xs_ref, lds_ref = ref.laplace_sparse_reference(W, rhs, *ker["csr"], v, t)
    assert rel(xs, xs_ref) < 1e-8
    assert rel(lds, lds_ref) < 1e-8
    # Same full-rank kernel through both forms (K from eigenpairs vs its sparse precision).
    assert rel(xs, x_ref if n == 1 else ref.laplace_solve_eig_reference(
        W, rhs, ker["evals"], ker["evecs"], v, t)) < 1e-8
    full_ld = laplace_logdet_eig(W, ker["evals"], ker["evecs"], v, t)
    assert rel(lds, full_ld) < 1e-8


def assert_grads_close(got, want, label: str) -> None:
    """Gradients to 1e-8 relative to the scale of each reference output: a gradient that is
    zero by symmetry (theta with a single spot) is compared to rounding noise, not to itself."""
    for name, a, b in zip(("logdet", "W", "v", "theta"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{label}: {name}"
        scale = max(float(b.abs().max()), 1.0)
        assert float((a - b).abs().max()) <= 1e-8 * scale, f"{label}: gradient w.r.t. {name}"


# n = 400 only with q = 2: the dense autograd reference is slow.
GRAD_CASES = [(n, q, t, s) for n, q in SMALL for t in THETAS for s in (True, False)] + [
    (400, 2, t, False) for t in (1e-3, 0.999)
]


@pytest.mark.parametrize("n,q,theta,shared", GRAD_CASES)
def test_sparse_logdet_gradients_match_dense_autograd(n, q, theta, shared) -> None:
    gen = torch.Generator().manual_seed(n * 100 + q * 10 + int(theta * 7) + shared + 1)
    ker = kernel(n)
    W = random_W(3, n, q, gen)
    v, t = variance(3, q, theta, shared, gen)
    got = laplace_sparse_logdet_grad(W, *ker["csr"], v, t)
    want = ref.laplace_sparse_logdet_grad_reference(W, *ker["csr"], v, t)
    assert_grads_close(got, want, f"n={n} q={q} theta={theta}")
    # the same log-determinant as the solve op, and a symmetric d/dW
    assert rel(got[0], laplace_sparse(W, None, *ker["csr"], v, t)[1]) < 1e-12
    assert torch.equal(got[1], got[1].transpose(-1, -2)) or rel(
        got[1], got[1].transpose(-1, -2)) < 1e-14


def irregular_precision(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CAR-like precision on a graph unlike a grid: a random 5-nearest-neighbour component, a
    path, a star around one hub, and isolated spots, in shuffled order (several elimination-tree
    roots, long chains, one wide column)."""
    rng = np.random.default_rng(seed)
    xy = rng.random((60, 2))
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    knn = np.argsort(d, 1)[:, 1:6]
    edges = [(i, int(j)) for i in range(60) for j in knn[i]]
    edges += [(60 + i, 61 + i) for i in range(24)]  # path of 25 spots
    edges += [(85, 86 + i) for i in range(30)]  # hub 85 with 30 leaves
    n = 85 + 31 + 4  # 4 isolated spots
    rows, cols = zip(*edges)
    A = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    A = ((A + A.T) > 0).astype(float)
    deg = np.asarray(A.sum(1)).ravel()
    M = sp.diags(np.maximum(deg, 1.0)) - 0.9 * A
    order = rng.permutation(n)
    return csr_tensors(M.tocsr()[order][:, order])


@pytest.mark.parametrize("q", [1, 3])
def test_sparse_ops_on_irregular_graphs(q: int) -> None:
    gen = torch.Generator().manual_seed(40 + q)
    csr = irregular_precision(q)
    n = csr[0].numel() - 1
    W = random_W(2, n, q, gen)
    rhs = torch.randn(2, 3, n, q, dtype=F64, generator=gen)
    v, t = variance(2, q, 0.6, False, gen)
    x, ld = laplace_sparse(W, rhs, *csr, v, t)
    x_ref, ld_ref = ref.laplace_sparse_reference(W, rhs, *csr, v, t)
    assert rel(x, x_ref) < 1e-10 and rel(ld, ld_ref) < 1e-12
    assert_grads_close(laplace_sparse_logdet_grad(W, *csr, v, t),
                       ref.laplace_sparse_logdet_grad_reference(W, *csr, v, t), "irregular")
    scale, shift = torch.tensor([0.7, 3.0], dtype=F64), torch.tensor([0.0, 2.5], dtype=F64)
    b = torch.randn(2, 2, n, dtype=F64, generator=gen)
    got = sparse_shifted_solve(*csr, scale, shift, b, trace_inverse=True)
    want = ref.sparse_shifted_solve_reference(*csr, scale, shift, b, True)
    for a, w in zip(got, want):
        assert rel(a, w) < 1e-10
    assert rel(sparse_inverse_diagonal(*csr), ref.sparse_inverse_diagonal_reference(*csr)) < 1e-12


def one_gene(seed: int, side: int, q: int, theta: float):
    """One gene's system on a side x side CAR grid: generator, kernel, W, two right-hand sides,
    v and theta."""
    gen = torch.Generator().manual_seed(seed)
    ker = car_kernel(side, side)
    W = random_W(1, ker["n"], q, gen)
    rhs = torch.randn(1, 2, ker["n"], q, dtype=F64, generator=gen)
    v, t = variance(1, q, theta, False, gen)
    return gen, ker, W, rhs, v, t


def test_sparse_large_fronts_match_dense_reference() -> None:
    """A 36 x 36 grid with q = 4: its last supernodes are large enough for the factorisation's
    BLAS path (dense Cholesky, triangular solve and the blocked Schur update of big fronts)."""
    _, ker, W, rhs, v, t = one_gene(36, 36, 4, 0.7)
    x, ld = laplace_sparse(W, rhs, *ker["csr"], v, t)
    x_ref, ld_ref = ref.laplace_sparse_reference(W, rhs, *ker["csr"], v, t)
    assert rel(x, x_ref) < 1e-9 and rel(ld, ld_ref) < 1e-12


def test_selected_inversion_of_large_fronts_matches_solves() -> None:
    """d log det H / d W_s = (H^-1)_ss from the selected inversion of a 48 x 48 grid with q = 4
    (fronts large enough for its BLAS path), against solves with unit vectors at 30 spots (the
    solves use the factorisation checked against the dense reference above)."""
    gen, ker, W, _, v, t = one_gene(48, 48, 4, 0.7)
    n, q = ker["n"], 4
    grad_W = laplace_sparse_logdet_grad(W, *ker["csr"], v, t)[1]
    spots = torch.randperm(n, generator=gen)[:30]
    unit = torch.zeros(1, 30 * q, n, q, dtype=F64)
    for i, s in enumerate(spots.tolist()):
        for j in range(q):
            unit[0, i * q + j, s, j] = 1.0
    cols = laplace_sparse(W, unit, *ker["csr"], v, t)[0].reshape(30, q, n, q)
    blocks = torch.stack([cols[i, :, s, :] for i, s in enumerate(spots.tolist())])
    assert rel(grad_W[0, spots], blocks) < 1e-9


def test_one_gene_factorised_over_threads_gives_the_same_bits() -> None:
    """A single gene's factorisation spreads independent subtrees over the threads; the result
    must not depend on that schedule (each front adds its children's updates in one order).
    Every front of this size stays below the BLAS threshold, whose kernels may round differently
    with their own thread count."""
    gen, ker, W, rhs, v, t = one_gene(37, 36, 3, 0.6)
    b = torch.randn(1, 1, ker["n"], dtype=F64, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append((*laplace_sparse(W, rhs, *ker["csr"], v, t),
                            *laplace_sparse_logdet_grad(W, *ker["csr"], v, t),
                            *sparse_shifted_solve(*ker["csr"], v[:, 0] + 0.25, t[:, 0], b,
                                                  trace_inverse=True)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)
    x_ref, ld_ref = ref.laplace_sparse_reference(W, rhs, *ker["csr"], v, t)
    assert rel(results[1][0], x_ref) < 1e-10 and rel(results[1][1], ld_ref) < 1e-12


def test_repeated_shifted_systems_reuse_exact_results() -> None:
    """A repeated (Q, a, tau) is served from what was factorised before: the same numbers, also
    for traces asked after a plain solve, and never those of another Q with the same pattern."""
    csr = irregular_precision(7)
    n = csr[0].numel() - 1
    gen = torch.Generator().manual_seed(8)
    scale, shift = torch.tensor([0.9, 1.7], dtype=F64), torch.tensor([0.3, 4.0], dtype=F64)
    b1, b2 = (torch.randn(2, 2, n, dtype=F64, generator=gen) for _ in range(2))
    x1, ld1 = sparse_shifted_solve(*csr, scale, shift, b1)
    x2, ld2 = sparse_shifted_solve(*csr, scale, shift, b2)  # same systems, new right-hand sides
    want2 = ref.sparse_shifted_solve_reference(*csr, scale, shift, b2, True)
    assert torch.equal(ld1, ld2) and rel(x2, want2[0]) < 1e-10
    _, _, trace = sparse_shifted_solve(*csr, scale, shift, b1, trace_inverse=True)
    assert rel(trace, want2[2]) < 1e-10
    other = (csr[0], csr[1], 1.5 * csr[2])  # same pattern, other values
    x3, ld3 = sparse_shifted_solve(*other, scale, shift, b2)
    want3 = ref.sparse_shifted_solve_reference(*other, scale, shift, b2)
    assert rel(x3, want3[0]) < 1e-10 and rel(ld3, want3[1]) < 1e-12
    W = random_W(2, n, 2, gen)
    v, t = variance(2, 2, 0.4, False, gen)
    for values in (csr[2], 1.5 * csr[2]):  # the Laplace system's log-det reuses the same
        Q = (csr[0], csr[1], values)
        rhs = torch.ones(2, 1, n, 2, dtype=F64)
        got = laplace_sparse(W, None, *Q, v, t)[1]
        assert rel(got, ref.laplace_sparse_reference(W, rhs, *Q, v, t)[1]) < 1e-12


def test_sparse_logdet_autograd_and_float32() -> None:
    gen = torch.Generator().manual_seed(21)
    ker = kernel(7)
    W = random_W(2, 7, 2, gen, zero_frac=0.0)
    v, t = variance(2, 2, 0.5, False, gen)
    W, v, t = (x.clone().requires_grad_(True) for x in (W, v, t))
    # W enters H only through its symmetric part; perturb it symmetrically
    assert torch.autograd.gradcheck(
        lambda a, b, c: laplace_sparse_logdet((a + a.transpose(-1, -2)) / 2, *ker["csr"], b, c),
        (W, v, t))
    # first derivatives only: a second derivative must not be silently wrong
    (g,) = torch.autograd.grad(laplace_sparse_logdet(W, *ker["csr"], v, t).sum(), v,
                               create_graph=True)
    assert not g.requires_grad
    out32 = laplace_sparse_logdet_grad(W.detach().float(), *ker["csr"], v.detach().float(),
                                       t.detach())
    assert [x.dtype for x in out32] == [torch.float32, torch.float32, torch.float32, F64]
    with use_reference():
        fallback = laplace_sparse_logdet_grad(W.detach(), *ker["csr"], v.detach(), t.detach())
    assert_grads_close(laplace_sparse_logdet_grad(W.detach(), *ker["csr"], v.detach(),
                                                  t.detach()), fallback, "fallback")


def test_sparse_logdet_grad_errors_name_the_argument() -> None:
    gen = torch.Generator().manual_seed(22)
    ker = kernel(7)
    W = random_W(2, 7, 2, gen)
    v, t = variance(2, 2, 0.5, False, gen)
    with pytest.raises(ValueError, match="`theta`"):
        laplace_sparse_logdet_grad(W, *ker["csr"], v, torch.zeros_like(t))
    with pytest.raises(ValueError, match="`v`"):
        laplace_sparse_logdet_grad(W, *ker["csr"], v[:, :1], t)
    with pytest.raises(ValueError, match="`crow`"):
        laplace_sparse_logdet_grad(W[:, :6], *ker["csr"], v, t)
    if has_native_kernel("laplace_sparse_logdet_grad", W.device):
        with pytest.raises(ValueError, match="`W`"):
            torch.ops.splisosm.laplace_sparse_logdet_grad(W[0], *ker["csr"], v, t)
        bad = W.clone()
        bad[1, 3] = -torch.eye(2, dtype=F64) * 100
        with pytest.raises(RuntimeError, match="gene 1"):
            laplace_sparse_logdet_grad(bad, *ker["csr"], v, t)


def test_single_rhs_shape_and_float32() -> None:
    gen = torch.Generator().manual_seed(1)
    ker = kernel(50)
    W = random_W(2, 50, 2, gen)
    rhs = torch.randn(2, 50, 2, dtype=F64, generator=gen)
    v, t = variance(2, 2, 0.5, False, gen)
    x64 = laplace_solve_eig(W, rhs, ker["evals"], ker["evecs"], v, t, tol=1e-12)
    assert x64.shape == rhs.shape
    x32 = laplace_solve_eig(
        W.float(), rhs.float(), ker["evals"].float(), ker["evecs"].float(), v.float(), t.float()
    )
    assert x32.dtype == torch.float32 and rel(x32.double(), x64) < 1e-4
    xs32, ld32 = laplace_sparse(W.float(), rhs.float(), *ker["csr"], v.float(), t.float())
    assert xs32.dtype == ld32.dtype == torch.float32 and rel(xs32.double(), x64) < 1e-5
    none, ld = laplace_sparse(W, None, *ker["csr"], v, t)
    assert none is None and rel(ld, ld32.double()) < 1e-6
    low = (ker["evals"][:10], ker["evecs"][:, :10])
    none, ld = laplace_lowrank(W, None, *low, v, t)
    assert none is None and rel(ld, laplace_logdet_eig(W, *low, v, t)) < 1e-12
    with pytest.raises(ValueError, match="`evecs` must be low rank"):
        laplace_lowrank(W, rhs, ker["evals"], ker["evecs"], v, t)


def test_iterations_and_nonconvergence_name_the_gene() -> None:
    gen = torch.Generator().manual_seed(2)
    ker = kernel(50)
    W = random_W(3, 50, 2, gen)
    rhs = torch.randn(3, 50, 2, dtype=F64, generator=gen)
    v, t = variance(3, 2, 0.5, True, gen)
    _, iters = laplace_solve_eig(W, rhs, ker["evals"], ker["evecs"], v, t, return_iterations=True)
    if has_native_kernel("laplace_solve_eig", W.device):
        assert iters.dtype == torch.int64 and bool((iters > 1).all())
        with pytest.raises(RuntimeError, match=r"gene 0: CG did not reach"):
            laplace_solve_eig(W, rhs, ker["evals"], ker["evecs"], v, t, max_iter=2)


def test_zero_rhs_gives_zero() -> None:
    gen = torch.Generator().manual_seed(3)
    ker = kernel(7)
    W = random_W(2, 7, 2, gen)
    v, t = variance(2, 2, 0.5, True, gen)
    zero = torch.zeros(2, 1, 7, 2, dtype=F64)
    assert torch.equal(laplace_solve_eig(W, zero, ker["evals"], ker["evecs"], v, t), zero)
    assert torch.equal(laplace_sparse(W, zero, *ker["csr"], v, t)[0], zero)


def test_reference_fallback_matches_native() -> None:
    gen = torch.Generator().manual_seed(4)
    ker = kernel(50)
    W = random_W(2, 50, 2, gen)
    rhs = torch.randn(2, 1, 50, 2, dtype=F64, generator=gen)
    v, t = variance(2, 2, 0.5, False, gen)
    lam, V = ker["evals"][:20], ker["evecs"][:, :20]
    native = (
        laplace_solve_eig(W, rhs, lam, V, v, t, tol=1e-13),
        laplace_logdet_eig(W, lam, V, v, t),
        *laplace_lowrank(W, rhs, lam, V, v, t),
        *laplace_sparse(W, rhs, *ker["csr"], v, t),
    )
    with use_reference():
        fallback = (
            laplace_solve_eig(W, rhs, lam, V, v, t),
            laplace_logdet_eig(W, lam, V, v, t),
            *laplace_lowrank(W, rhs, lam, V, v, t),
            *laplace_sparse(W, rhs, *ker["csr"], v, t),
        )
    for a, b in zip(native, fallback):
        assert rel(a, b) < 1e-9


# ---------------------------------------------------------------------------------- sparse helpers
def test_shifted_solve_and_inverse_diagonal() -> None:
    gen = torch.Generator().manual_seed(5)
    ker = kernel(400)
    scale = 0.5 + torch.rand(3, dtype=F64, generator=gen)
    shift = torch.rand(3, dtype=F64, generator=gen)
    shift[0] = 0.0
    b = torch.randn(3, 2, 400, dtype=F64, generator=gen)
    x, ld = sparse_shifted_solve(*ker["csr"], scale, shift, b)
    x_ref, ld_ref, tr_ref = ref.sparse_shifted_solve_reference(*ker["csr"], scale, shift, b, True)
    assert rel(x, x_ref) < 1e-10 and rel(ld, ld_ref) < 1e-10
    x_tr, ld_tr, tr = sparse_shifted_solve(*ker["csr"], scale, shift, b, trace_inverse=True)
    assert torch.equal(x_tr, x) and torch.equal(ld_tr, ld) and rel(tr, tr_ref) < 1e-12
    M = ker["M"]
    diag = sparse_inverse_diagonal(*csr_tensors(M))
    dense = torch.from_numpy(np.diag(np.linalg.inv(M.toarray())).copy())
    assert rel(diag, dense) < 1e-12
    # Unsorted columns and duplicate entries (summed) are accepted as scipy would read them.
    crow, col, val = csr_tensors(M)
    flip = torch.cat([torch.arange(crow[i + 1] - 1, crow[i] - 1, -1) for i in range(400)])
    half = val[flip] / 2
    rows = torch.repeat_interleave(torch.arange(400), crow.diff())
    dup_crow = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(2 * crow.diff(), 0)])
    dup_col = torch.stack([col[flip], col[flip]], 1).reshape(-1)
    dup_val = torch.stack([half, half], 1).reshape(-1)
    assert bool((rows[flip] == rows).all())
    assert rel(sparse_inverse_diagonal(dup_crow, dup_col, dup_val), dense) < 1e-12
    # S = diag(M^-1) standardises K: Q = S^1/2 M S^1/2 has the precision of a unit-diagonal K.
    assert rel(sparse_inverse_diagonal(*ker["csr"]), torch.ones(400, dtype=F64)) < 1e-12


@pytest.mark.parametrize("n", [1, 7, 50])
def test_shifted_solve_and_inverse_diagonal_small_sizes(n: int) -> None:
    """One spot (a lone self-loop graph), and small grids, against the dense references."""
    gen = torch.Generator().manual_seed(n)
    ker = kernel(n)
    scale = 0.5 + torch.rand(2, dtype=F64, generator=gen)
    shift = torch.tensor([0.0, 0.7], dtype=F64)  # no shift: log det of the scaled Q alone
    b = torch.randn(2, 3, n, dtype=F64, generator=gen)
    x, ld, tr = sparse_shifted_solve(*ker["csr"], scale, shift, b, trace_inverse=True)
    x_ref, ld_ref, tr_ref = ref.sparse_shifted_solve_reference(*ker["csr"], scale, shift, b, True)
    assert rel(x, x_ref) < 1e-10 and rel(ld, ld_ref) < 1e-10 and rel(tr, tr_ref) < 1e-12
    M = csr_tensors(ker["M"])
    assert rel(sparse_inverse_diagonal(*M), ref.sparse_inverse_diagonal_reference(*M)) < 1e-12


# ---------------------------------------------------------------------------------- errors
def _small():
    gen = torch.Generator().manual_seed(6)
    ker = kernel(7)
    W = random_W(3, 7, 2, gen, zero_frac=0.0)
    rhs = torch.randn(3, 1, 7, 2, dtype=F64, generator=gen)
    v, t = variance(3, 2, 0.5, True, gen)
    return ker, W, rhs, v, t


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("W", torch.zeros(3, 7, 2), "`W`"),
        ("rhs", torch.zeros(3, 1, 6, 2, dtype=F64), "`rhs`"),
        ("v", -torch.ones(3, 2, dtype=F64), "`v`"),
        ("theta", torch.full((3, 2), 1.0, dtype=F64), "`theta`"),
        ("evecs", torch.zeros(6, 3, dtype=F64), "`evecs`"),
        ("evals", torch.zeros(5, dtype=F64), "`evals`"),
        ("W", torch.full((3, 7, 2, 2), float("nan"), dtype=F64), "`W` contains NaN"),
    ],
)
@pytest.mark.parametrize("native", [True, False])
def test_eig_bad_inputs_name_the_argument(field: str, value, match: str, native: bool) -> None:
    # the native kernel's checks and, before a reference, the wrapper's raise the same errors
    ker, W, rhs, v, t = _small()
    args = {"W": W, "rhs": rhs, "evals": ker["evals"], "evecs": ker["evecs"], "v": v, "theta": t}
    args[field] = value
    with use_reference(not native), pytest.raises(ValueError, match=match):
        laplace_solve_eig(**args)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("theta", torch.zeros(3, 2, dtype=F64), "`theta`"),
        ("val", torch.ones(3, dtype=torch.float32), "`val`"),
        ("crow", torch.arange(5, dtype=torch.int64), "`crow`"),
        ("col", torch.full((19,), 9, dtype=torch.int64), "`col`"),
    ],
)
@pytest.mark.parametrize("native", [True, False])
def test_sparse_bad_inputs_name_the_argument(field: str, value, match: str, native: bool) -> None:
    ker, W, rhs, v, t = _small()
    crow, col, val = ker["csr"]
    args = {"W": W, "rhs": rhs, "crow": crow, "col": col, "val": val, "v": v, "theta": t}
    args[field] = value
    with use_reference(not native), pytest.raises(ValueError, match=match):
        laplace_sparse(**args)


def test_csr_changed_in_place_is_checked_again() -> None:
    # the wrappers check a precision once per (tensors, versions); an in-place edit must not
    # slip through on the strength of an earlier check
    ker, W, rhs, v, t = _small()
    crow, col, val = (x.clone() for x in ker["csr"])
    laplace_sparse(W, rhs, crow, col, val, v, t)
    val[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        laplace_sparse(W, rhs, crow, col, val, v, t)
    col[1] = 10**6
    with pytest.raises(ValueError, match="`col` indices"):
        laplace_sparse(W, rhs, crow, col, val.nan_to_num(), v, t)


def test_native_checks_name_the_argument() -> None:
    ker, W, rhs, v, t = _small()
    if not has_native_kernel("laplace_sparse", W.device):
        pytest.skip("no native kernel in this build")
    # bad arguments are ValueErrors, as from the wrappers, which leave these checks to the ops
    with pytest.raises(ValueError, match="`rhs`"):
        torch.ops.splisosm.laplace_solve_eig(W, rhs[:, :, :5], ker["evals"], ker["evecs"], v, t,
                                             1e-10, 100)
    with pytest.raises(ValueError, match="`theta`"):
        torch.ops.splisosm.laplace_sparse(W, rhs, *ker["csr"], v, torch.ones_like(t))
    crow, col, val = csr_tensors(sp.csr_matrix(np.triu(np.ones((7, 7)))))
    with pytest.raises(RuntimeError, match="symmetric"):
        torch.ops.splisosm.laplace_sparse(W, rhs, crow, col, val, v, t)


@pytest.mark.parametrize("native", [True, False])
def test_non_spd_reports_the_gene(native: bool) -> None:
    ker, W, rhs, v, t = _small()
    W = W.clone()
    W[1, 3] = -1e6 * torch.eye(2, dtype=F64)  # gene 1 is not positive definite
    low = (ker["evals"][:3], ker["evecs"][:, :3])
    calls = [
        lambda: laplace_solve_eig(W, rhs, ker["evals"], ker["evecs"], v, t),
        lambda: laplace_logdet_eig(W, *low, v, t),
        lambda: laplace_logdet_eig(W, ker["evals"], ker["evecs"], v, t),
        lambda: laplace_lowrank(W, rhs, *low, v, t),
        lambda: laplace_sparse(W, rhs, *ker["csr"], v, t),
    ]
    with use_reference(not native):
        for call in calls:
            with pytest.raises(RuntimeError, match=r"gene 1\b"):
                call()
    # A precision that is not positive definite fails in the sparse factorisation of gene 0.
    crow, col, val = ker["csr"]
    match = r"gene 0\b" if native else "not positive definite"
    with use_reference(not native), pytest.raises(RuntimeError, match=match):
        laplace_sparse(W[:1], rhs[:1], crow, col, -val, v[:1], t[:1])


# ---------------------------------------------------------------------------------- opcheck
def test_opcheck_every_op() -> None:
    if not has_native_kernel("laplace_sparse", torch.device("cpu")):
        pytest.skip("no native kernel in this build")
    ker, W, rhs, v, t = _small()
    crow, col, val = ker["csr"]
    ops = torch.ops.splisosm
    torch.library.opcheck(ops.laplace_solve_eig, (W, rhs, ker["evals"], ker["evecs"], v, t,
                                                  1e-10, 200))
    torch.library.opcheck(ops.laplace_solve_eig, (W, rhs, ker["evals"][:3], ker["evecs"][:, :3],
                                                  v, t, 1e-10, 200))
    torch.library.opcheck(ops.laplace_logdet_eig, (W, ker["evals"], ker["evecs"], v, t))
    torch.library.opcheck(ops.laplace_logdet_eig, (W, ker["evals"][:3], ker["evecs"][:, :3], v, t))
    torch.library.opcheck(ops.laplace_lowrank, (W, rhs, ker["evals"][:3], ker["evecs"][:, :3],
                                                v, t))
    torch.library.opcheck(ops.laplace_sparse, (W, rhs, crow, col, val, v, t))
    torch.library.opcheck(ops.laplace_sparse, (W.float(), rhs.float(), crow, col, val, v.float(),
                                               t.float()))
    scale, shift = torch.ones(2, dtype=F64), torch.full((2,), 0.5, dtype=F64)
    b = rhs[:2, :, :, 0]
    torch.library.opcheck(ops.sparse_shifted_solve, (crow, col, val, scale, shift, b))
    torch.library.opcheck(ops.sparse_shifted_solve, (crow, col, val, scale, shift, b, True))
    torch.library.opcheck(ops.laplace_sparse_logdet_grad, (W, crow, col, val, v, t))
    torch.library.opcheck(ops.laplace_sparse_logdet_grad, (W.float(), crow, col, val, v.float(),
                                                           t.float()))
    torch.library.opcheck(ops.sparse_inverse_diagonal, (crow, col, val))


def test_opcheck_sparse_logdet_autograd() -> None:
    """laplace_sparse_logdet_grad is differentiable in its log-determinant (autograd registered
    in Python, used by laplace_sparse_logdet): opcheck with inputs that require gradients checks
    the registration, gradcheck the formula in float64."""
    if not has_native_kernel("laplace_sparse_logdet_grad", torch.device("cpu")):
        pytest.skip("no native kernel in this build")
    gen = torch.Generator().manual_seed(23)
    ker = kernel(7)
    crow, col, val = ker["csr"]
    W = random_W(2, 7, 2, gen, zero_frac=0.0)
    v, t = variance(2, 2, 0.5, False, gen)
    W, v, t = (x.clone().requires_grad_(True) for x in (W, v, t))
    op = torch.ops.splisosm.laplace_sparse_logdet_grad
    for args in ((W, crow, col, val, v, t),
                 (W.detach().float().requires_grad_(True), crow, col, val, v, t.detach())):
        result = torch.library.opcheck(op, args)
        assert result["test_autograd_registration"] == "SUCCESS"
    # W enters H only through its symmetric part; perturb it symmetrically
    assert torch.autograd.gradcheck(
        lambda a, b, c: op((a + a.transpose(-1, -2)) / 2, crow, col, val, b, c)[0], (W, v, t))
    # the other outputs are the derivatives themselves: not differentiable
    assert not any(x.requires_grad for x in op(W, crow, col, val, v, t)[1:])
    with use_reference():  # the fallback differentiates the dense log-determinant
        assert torch.autograd.gradcheck(
            lambda a, b, c: laplace_sparse_logdet((a + a.transpose(-1, -2)) / 2, crow, col, val,
                                                  b, c), (W, v, t))

