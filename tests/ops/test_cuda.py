"""CUDA kernels against the CPU kernels and the pure-torch references.

Every test needs a CUDA device and is skipped without one; with a device, a build whose extension
lacks the CUDA kernels fails (test_every_op_has_a_cuda_kernel) instead of silently testing the
reference fallback.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.testing import assert_close

from helpers import reference_models as models
from helpers.ops_inputs import random_multinom_inputs
from splisosm import ops
from splisosm.ops import laplace_reference as ref
from splisosm.ops.engine import engine_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

F64, F32 = torch.float64, torch.float32
OPS = ("multinom_terms", "fixed_effect_info", "laplace_solve_eig", "laplace_logdet_eig",
       "laplace_lowrank", "laplace_sparse", "sparse_shifted_solve", "sparse_inverse_diagonal",
       "joint_gd_fit")
S = torch.ops.splisosm


def cuda(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.cuda() for t in ts]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_every_op_has_a_cuda_kernel() -> None:
    assert ops.NATIVE_AVAILABLE, "the compiled extension splisosm._C is not importable"
    missing = [op for op in OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"splisosm::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel for {missing}: was the extension built with CUDA?"


# ---------------------------------------------------------------------------- multinomial ops
# q = m - 1 covers the compile-time kernels (1..4) and the run-time-q kernel (5, 9); n = 300
# spans two thread blocks per gene, so the per-block partial log-likelihoods are exercised.
MULTINOM_SHAPES = [(1, 1, 2), (3, 7, 2), (2, 50, 3), (4, 33, 5), (2, 300, 6), (1, 200, 10),
                   (5, 1, 4)]


@pytest.mark.parametrize("G,n,m", MULTINOM_SHAPES)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_multinom_terms_matches_cpu_and_reference(G: int, n: int, m: int, dtype) -> None:
    eta, counts = random_multinom_inputs(G, n, m, dtype=dtype)
    counts[:, ::3] = 0  # zero-count spots
    got = S.multinom_terms(*cuda(eta, counts))
    cpu = S.multinom_terms(eta, counts)
    want = ops.multinom_terms_reference(eta.double(), counts.double())
    rtol, atol = (1e-12, 1e-10) if dtype == F64 else (1e-4, 1e-3)
    for a, c, w in zip(got, cpu, want):
        assert a.is_cuda and a.dtype == dtype and a.shape == c.shape
        assert_close(a.cpu(), c, rtol=rtol, atol=atol)
        assert_close(a.cpu().double(), w, rtol=rtol, atol=atol)


def test_multinom_terms_extreme_logits_and_lgamma_counts() -> None:
    eta, counts = random_multinom_inputs(2, 40, 4)
    eta = eta.sign() * 100.0 + eta  # |eta| ~ 100: the shifted softmax must not overflow
    counts[0, 0, 0] = 5000.0  # large count
    counts[1, 1, 1] = 2.5  # non-integer count
    got = S.multinom_terms(*cuda(eta, counts))
    want = ops.multinom_terms_reference(eta, counts)
    for a, w in zip(got, want):
        assert torch.isfinite(a).all()
        assert_close(a.cpu(), w, rtol=1e-10, atol=1e-8)


def test_multinom_terms_reports_bad_counts() -> None:
    eta, counts = cuda(*random_multinom_inputs(2, 10, 3))
    negative = counts.clone()
    negative[1, 3, 0] = -1.0
    with pytest.raises(RuntimeError, match="negative"):
        S.multinom_terms(eta, negative)
    non_finite = negative.clone()
    non_finite[0, 2, 2] = float("nan")  # non-finite wins over negative, as on the CPU
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        S.multinom_terms(eta, non_finite)
    with pytest.raises(RuntimeError, match="`counts` must be on the device of `eta`"):
        S.multinom_terms(eta, counts.cpu())


@pytest.mark.parametrize("G,n,q,P", [(1, 1, 1, 0), (3, 40, 2, 1), (2, 300, 3, 2), (4, 77, 5, 3),
                                     (1, 1000, 2, 0)])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_fixed_effect_info_matches_cpu_and_reference(G: int, n: int, q: int, P: int, dtype) -> None:
    eta, counts = random_multinom_inputs(G, n, q + 1)
    _, resid, W = ops.multinom_terms_reference(eta, counts)
    X = torch.randn(n, P, dtype=F64)
    want = ops.fixed_effect_info_reference(X, W, resid)
    X, W, resid = X.to(dtype), W.to(dtype), resid.to(dtype)
    got = S.fixed_effect_info(*cuda(X, W, resid))
    cpu = S.fixed_effect_info(X, W, resid)
    rtol, atol = (1e-12, 1e-9) if dtype == F64 else (1e-4, 1e-2)
    for a, c, w in zip(got, cpu, want):
        assert a.is_cuda and a.dtype == dtype and a.shape == c.shape == w.shape
        assert_close(a.cpu(), c, rtol=rtol, atol=atol)
        assert_close(a.cpu().double(), w, rtol=rtol, atol=atol)


def test_multinom_ops_through_the_wrappers_use_the_cuda_kernels() -> None:
    eta, counts = random_multinom_inputs(3, 20, 3)
    assert ops.has_native_kernel("multinom_terms", torch.device("cuda"))
    _, grad, W = ops.multinom_terms(*cuda(eta, counts))
    _, grad_cpu, W_cpu = ops.multinom_terms(eta, counts)
    X = torch.randn(20, 2, dtype=F64)
    info, score = ops.fixed_effect_info(X.cuda(), W, grad)
    info_cpu, score_cpu = ops.fixed_effect_info(X, W_cpu, grad_cpu)
    assert info.is_cuda and score.is_cuda
    assert_close(info.cpu(), info_cpu, rtol=1e-12, atol=1e-9)
    assert_close(score.cpu(), score_cpu, rtol=1e-12, atol=1e-9)


# ---------------------------------------------------------------------------- Laplace ops
def car_kernel(nx: int, ny: int, rho: float = 0.9) -> dict:
    """Standardised CAR kernel of a rook grid: eigenpairs (descending) and sparse precision."""
    n = nx * ny
    idx = np.arange(n).reshape(nx, ny)
    A = np.zeros((n, n))
    for a, b in ((idx[:-1, :], idx[1:, :]), (idx[:, :-1], idx[:, 1:])):
        A[a.ravel(), b.ravel()] = A[b.ravel(), a.ravel()] = 1.0
    A[np.diag_indices(n)] += A.sum(1) == 0  # isolated spots get a self-loop
    dm = 1 / np.sqrt(np.maximum(A.sum(1), 1e-12))
    M = np.eye(n) - rho * dm[:, None] * A * dm[None, :]
    Minv = np.linalg.inv(M)
    s = np.diag(Minv).copy()
    K = Minv / np.sqrt(np.outer(s, s))
    lam, V = np.linalg.eigh((K + K.T) / 2)
    Q = sp.csr_matrix(np.sqrt(s)[:, None] * M * np.sqrt(s)[None, :])
    Q.sort_indices()
    return {
        "evals": torch.from_numpy(lam[::-1].copy()),
        "evecs": torch.from_numpy(V[:, ::-1].copy()),
        "csr": tuple(torch.from_numpy(a.copy()) for a in (Q.indptr.astype(np.int64),
                                                         Q.indices.astype(np.int64), Q.data)),
    }


GRIDS = {1: (1, 1), 7: (7, 1), 50: (5, 10), 400: (20, 20)}


@pytest.fixture(scope="module")
def kernels() -> dict[int, dict]:
    return {n: car_kernel(*shape) for n, shape in GRIDS.items()}


def laplace_inputs(G: int, n: int, q: int, theta: float, seed: int):
    """Multinomial curvature blocks with a quarter of the spots empty, and variances (G, q)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch._sample_dirichlet(torch.ones(G, n, q + 1, dtype=F64), generator=gen)
    N = torch.poisson(torch.full((G, n), 8.0, dtype=F64), generator=gen)
    N = N * (torch.rand(G, n, dtype=F64, generator=gen) > 0.25)
    W = N[..., None, None] * (torch.diag_embed(p) - p[..., :, None] * p[..., None, :])[..., :q, :q]
    v = 0.2 + torch.rand(G, q, dtype=F64, generator=gen)
    t = (theta * (1 + 0.2 * (torch.rand(G, q, dtype=F64, generator=gen) - 0.5))).clamp(max=0.9995)
    return W, v, t, gen


LAPLACE_CASES = [(1, 1, 1.0), (7, 2, 1.0), (50, 1, 1.0), (50, 3, 0.4), (400, 2, 1.0),
                 (400, 2, 0.25), (400, 4, 0.1)]


def rank_of(n: int, frac: float) -> int:
    return max(1, math.ceil(n * frac))


@pytest.mark.parametrize("n,q,frac", LAPLACE_CASES)
@pytest.mark.parametrize("theta", [1e-3, 0.5, 0.999])
def test_laplace_solve_eig_matches_cpu_and_reference(kernels, n, q, frac, theta) -> None:
    G, R = 3, 2
    W, v, t, gen = laplace_inputs(G, n, q, theta, seed=n * 10 + q)
    rhs = torch.randn(G, R, n, q, dtype=F64, generator=gen)
    r = rank_of(n, frac)
    lam, V = kernels[n]["evals"][:r], kernels[n]["evecs"][:, :r]
    args = (W, rhs, lam, V, v, t)
    x, iters = S.laplace_solve_eig(*cuda(*args), 1e-12, 20_000)
    x_cpu, iters_cpu = S.laplace_solve_eig(*args, 1e-12, 20_000)
    x_ref = ref.laplace_solve_eig_reference(*args)
    assert x.is_cuda and x.shape == rhs.shape and iters.is_cuda and iters.dtype == torch.int64
    assert rel(x, x_ref) < 1e-8
    assert rel(x, x_cpu) < 1e-8
    # Same algorithm in a different summation order: near tol = 1e-12 round-off can move the
    # iteration where the residual test first passes a little.
    assert ((iters.cpu() - iters_cpu).abs() <= 2 + iters_cpu // 10).all()
    assert (iters.cpu() >= 1).all()


@pytest.mark.parametrize("n,q,frac", LAPLACE_CASES)
@pytest.mark.parametrize("theta", [1e-3, 0.5, 0.999])
def test_laplace_logdet_eig_matches_cpu_and_reference(kernels, n, q, frac, theta) -> None:
    W, v, t, _ = laplace_inputs(3, n, q, theta, seed=n * 10 + q + 1)
    r = rank_of(n, frac)
    args = (W, kernels[n]["evals"][:r], kernels[n]["evecs"][:, :r], v, t)
    ld = S.laplace_logdet_eig(*cuda(*args))
    ld_cpu = S.laplace_logdet_eig(*args)
    ld_ref = ref.laplace_logdet_eig_reference(*args)
    assert ld.is_cuda and ld.shape == (3,)
    assert rel(ld, ld_ref) < 1e-9
    assert rel(ld, ld_cpu) < 1e-9


@pytest.mark.parametrize("n,q,r", [(7, 1, 2), (50, 2, 20), (50, 3, 7), (400, 2, 40), (400, 4, 40)])
@pytest.mark.parametrize("theta", [1e-3, 0.5, 0.999])
def test_laplace_lowrank_matches_cpu_and_reference(kernels, n, q, r, theta) -> None:
    G, R = 3, 2
    W, v, t, gen = laplace_inputs(G, n, q, theta, seed=n * 10 + q + 2)
    rhs = torch.randn(G, R, n, q, dtype=F64, generator=gen)
    lam, V = kernels[n]["evals"][:r], kernels[n]["evecs"][:, :r]
    x, ld = S.laplace_lowrank(*cuda(W, rhs, lam, V, v, t))
    x_cpu, ld_cpu = S.laplace_lowrank(W, rhs, lam, V, v, t)
    assert x.is_cuda and ld.is_cuda and x.shape == rhs.shape and ld.shape == (G,)
    assert rel(x, ref.laplace_solve_eig_reference(W, rhs, lam, V, v, t)) < 1e-8
    assert rel(ld, ref.laplace_logdet_eig_reference(W, lam, V, v, t)) < 1e-9
    assert rel(x, x_cpu) < 1e-9 and rel(ld, ld_cpu) < 1e-9
    # R = 0: the log-determinant alone, identical to laplace_logdet_eig.
    x0, ld0 = S.laplace_lowrank(*cuda(W, rhs[:, :0], lam, V, v, t))
    assert x0.shape == (G, 0, n, q)
    assert rel(ld0, S.laplace_logdet_eig(*cuda(W, lam, V, v, t))) < 1e-12
    with pytest.raises(ValueError, match="must be low rank"):
        S.laplace_lowrank(*cuda(W, rhs, kernels[n]["evals"], kernels[n]["evecs"], v, t))


def test_laplace_eig_many_genes_match_cpu(kernels) -> None:
    """Sizes where CG threads walk several spots each (many systems) and where the full-rank
    log-determinant needs several gene chunks (250 genes of an 800 x 800 H)."""
    n, q = 400, 2
    W, v, t, gen = laplace_inputs(1000, n, q, 0.5, seed=19)
    rhs = torch.randn(1000, 1, n, q, dtype=F64, generator=gen)
    lam, V = kernels[n]["evals"][:40], kernels[n]["evecs"][:, :40]
    x, iters = S.laplace_solve_eig(*cuda(W, rhs, lam, V, v, t), 1e-10, 5000)
    x_cpu, iters_cpu = S.laplace_solve_eig(W, rhs, lam, V, v, t, 1e-10, 5000)
    assert rel(x, x_cpu) < 1e-8
    assert ((iters.cpu() - iters_cpu).abs() <= 2 + iters_cpu // 10).all()
    full = (W[:250], kernels[n]["evals"], kernels[n]["evecs"], v[:250], t[:250])
    assert rel(S.laplace_logdet_eig(*cuda(*full)), S.laplace_logdet_eig(*full)) < 1e-9


def test_laplace_eig_float32_inputs_and_zero_rhs(kernels) -> None:
    n, q = 50, 2
    W, v, t, gen = laplace_inputs(2, n, q, 0.5, seed=5)
    rhs = torch.randn(2, 1, n, q, dtype=F64, generator=gen)
    rhs[1] = 0.0
    lam, V = kernels[n]["evals"][:20], kernels[n]["evecs"][:, :20]
    args32 = [a.float() for a in (W, rhs, lam, V, v, t)]
    # The kernels compute in float64 whatever the input dtype: against the float64 reference of
    # the same (rounded) inputs only the final rounding to float32 differs.
    x, iters = S.laplace_solve_eig(*cuda(*args32), 1e-12, 1000)
    assert x.dtype == F32
    assert rel(x[0], ref.laplace_solve_eig_reference(*args32)[0]) < 1e-6
    assert (x[1] == 0).all() and iters[1].item() == 0 and iters[0].item() >= 1
    W32, _, lam32, V32, v32, t32 = args32
    ld = S.laplace_logdet_eig(*cuda(W32, lam32, V32, v32, t32))
    assert ld.dtype == F32
    assert rel(ld, ref.laplace_logdet_eig_reference(W32, lam32, V32, v32, t32)) < 1e-6


def test_laplace_eig_failures_name_the_gene(kernels) -> None:
    n, q = 50, 2
    W, v, t, gen = laplace_inputs(3, n, q, 0.5, seed=7)
    rhs = torch.randn(3, 1, n, q, dtype=F64, generator=gen)
    full = (kernels[n]["evals"], kernels[n]["evecs"])
    low = (kernels[n]["evals"][:10], kernels[n]["evecs"][:, :10])
    with pytest.raises(RuntimeError, match=r"gene 0: CG did not reach"):
        S.laplace_solve_eig(*cuda(W, rhs, *full, v, t), 1e-14, 1)
    bad = W.clone()
    bad[1, 4] = -1e3 * torch.eye(q, dtype=F64)  # indefinite block: H is not positive definite
    for lam, V in (full, low):
        with pytest.raises(RuntimeError, match=r"gene 1\b"):
            S.laplace_solve_eig(*cuda(bad, rhs, lam, V, v, t), 1e-10, 1000)
        with pytest.raises(RuntimeError, match=r"gene 1\b"):
            S.laplace_logdet_eig(*cuda(bad, lam, V, v, t))
    with pytest.raises(RuntimeError, match=r"laplace_lowrank: gene 1\b"):
        S.laplace_lowrank(*cuda(bad, rhs, *low, v, t))
    with pytest.raises(ValueError, match="`evecs` must be on the device of `W`"):
        S.laplace_solve_eig(*cuda(W, rhs, full[0]), full[1], *cuda(v, t), 1e-10, 100)
    with pytest.raises(ValueError, match="`theta` .*must satisfy"):
        S.laplace_logdet_eig(*cuda(W, *full, v, torch.ones_like(t)))


def test_laplace_wrappers_on_cuda(kernels) -> None:
    n, q = 50, 2
    W, v, t, gen = laplace_inputs(2, n, q, 0.5, seed=11)
    rhs = torch.randn(2, n, q, dtype=F64, generator=gen)
    lam, V = kernels[n]["evals"], kernels[n]["evecs"]
    x, iters = ops.laplace_solve_eig(*cuda(W, rhs, lam, V, v, t), tol=1e-12,
                                     return_iterations=True)
    assert x.shape == rhs.shape and x.is_cuda and (iters > 0).all()
    assert rel(x, ref.laplace_solve_eig_reference(W, rhs[:, None], lam, V, v, t)[:, 0]) < 1e-8
    ld = ops.laplace_logdet_eig(*cuda(W, lam, V, v, t))
    assert rel(ld, ref.laplace_logdet_eig_reference(W, lam, V, v, t)) < 1e-9


def test_sparse_ops_fall_back_to_the_cpu_kernels(kernels) -> None:
    n, q = 50, 2
    W, v, t, gen = laplace_inputs(2, n, q, 0.5, seed=13)
    rhs = torch.randn(2, 2, n, q, dtype=F64, generator=gen)
    crow, col, val = kernels[n]["csr"]
    args = (W, rhs, crow, col, val, v, t)
    x, ld = S.laplace_sparse(*cuda(*args))
    x_cpu, ld_cpu = S.laplace_sparse(*args)
    assert x.is_cuda and ld.is_cuda
    assert torch.equal(x.cpu(), x_cpu) and torch.equal(ld.cpu(), ld_cpu)
    scale, shift = torch.tensor([1.0, 2.5], dtype=F64), torch.tensor([0.5, 0.0], dtype=F64)
    b = torch.randn(2, 3, n, dtype=F64, generator=gen)
    y, ldm = S.sparse_shifted_solve(*cuda(crow, col, val, scale, shift, b))
    y_cpu, ldm_cpu = S.sparse_shifted_solve(crow, col, val, scale, shift, b)
    assert y.is_cuda and torch.equal(y.cpu(), y_cpu) and torch.equal(ldm.cpu(), ldm_cpu)
    d = S.sparse_inverse_diagonal(*cuda(crow, col, val))
    assert d.is_cuda and torch.equal(d.cpu(), S.sparse_inverse_diagonal(crow, col, val))


def test_opcheck_cuda(kernels) -> None:
    n, q = 7, 2
    W, v, t, gen = laplace_inputs(2, n, q, 0.5, seed=17)
    rhs = torch.randn(2, 1, n, q, dtype=F64, generator=gen)
    lam, V = kernels[n]["evals"], kernels[n]["evecs"]
    eta, counts = random_multinom_inputs(2, n, q + 1)
    X = torch.randn(n, 1, dtype=F64)
    torch.library.opcheck(S.multinom_terms, tuple(cuda(eta, counts)))
    torch.library.opcheck(S.fixed_effect_info, tuple(cuda(X, W, rhs[:, 0])))
    for r in (n, 3):
        torch.library.opcheck(S.laplace_solve_eig,
                              (*cuda(W, rhs, lam[:r], V[:, :r], v, t), 1e-10, 200))
        torch.library.opcheck(S.laplace_logdet_eig, tuple(cuda(W, lam[:r], V[:, :r], v, t)))
    torch.library.opcheck(S.laplace_lowrank, tuple(cuda(W, rhs, lam[:3], V[:, :3], v, t)))


# ---------------------------------------------------------------------------- native engine
# Variants of the fit (settings of joint_gd_fit beyond the defaults below); each runs on both
# devices from the same start.
ENGINE_CASES = {
    "default": {},
    "gamma-prior": {"train_sigma": True, "prior": ("gamma", 2.0, 0.3)},
    "per-isoform-inv-gamma": {"train_sigma": True, "per_isoform": True,
                              "prior": ("inv_gamma", 3.0, 0.5)},
    "low-rank": {"train_sigma": True, "rank": 7},
    "white-noise": {"rank": 0, "train_theta": False},
    "sgd": {"optim": "sgd", "lr": 1e-3},
    "relative-tol": {"tol": 1e-4, "tol_relative": True, "patience": 3},
    "early-stop": {"tol": 0.05, "patience": 2},
    "no-design": {"covariates": 0},
    "six-isoforms": {"m": 6},
}


def engine_args(case: dict, *, genes: int = 3, side: int = 5, epochs: int = 200,
                dtype=F64, seed: int = 11) -> list:
    """Arguments of joint_gd_fit on the CPU for one ENGINE_CASES entry (one group of genes)."""
    K = models.car_kernel(side)
    m = case.get("m", 3)
    q, n = m - 1, K.shape[0]
    Y = models.simulate_counts(K, genes, m, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, case.get("covariates", 2), dtype=F64, generator=gen)
    lam, V = np.linalg.eigh(K)
    rank = case.get("rank", n)
    lam = torch.from_numpy(lam[::-1][:rank].copy())
    V = torch.from_numpy(V[:, ::-1][:, :rank].copy())
    C = q if case.get("per_isoform") else 1
    prior, alpha, beta = case.get("prior", ("none", 0.0, 0.0))
    start = [0.1 * torch.randn(genes, n, q, dtype=F64, generator=gen),
             torch.zeros(genes, X.shape[1], q, dtype=F64), torch.zeros(genes, q, dtype=F64),
             torch.full((genes, C), 0.6, dtype=F64), torch.full((genes, C), -3.0, dtype=F64)]
    shared = [X.to(dtype), lam.to(dtype), V.to(dtype)]
    return [[Y.to(dtype)], *shared] + [[t.to(dtype)] for t in start] + [
        case.get("train_sigma", False), case.get("train_theta", True), prior, alpha, beta, 0.01,
        1 - 1e-6, case.get("optim", "adam"), case.get("lr", 0.01), case.get("tol", 1e-5),
        case.get("tol_relative", False), case.get("patience", 5), epochs]


def on(device: str, args: list) -> list:
    def move(a):
        if isinstance(a, list):
            return [t.to(device) for t in a]
        return a.to(device) if isinstance(a, torch.Tensor) else a
    return [move(a) for a in args]


def run_engine(args: list, device: str = "cpu", group: int = 0) -> list:
    """joint_gd_fit on ``device``: the nine outputs of one group, then the low-variance flag."""
    out = S.joint_gd_fit(*on(device, args))
    return [o[group] for o in out[:9]] + [out[9]]


def assert_same_engine_fit(gpu: list, cpu: list) -> None:
    assert all(t.is_cuda for t in gpu)
    for a, c in zip(gpu[:5], cpu[:5]):  # best parameters
        assert a.dtype == c.dtype and a.shape == c.shape
        assert_close(a.cpu(), c, rtol=1e-6, atol=1e-6)
    assert gpu[5].shape == cpu[5].shape  # loss history: as many epochs
    assert_close(gpu[5].cpu(), cpu[5], rtol=1e-7, atol=1e-6)
    assert_close(gpu[6].cpu(), cpu[6], rtol=1e-7, atol=1e-6)
    assert torch.equal(gpu[7].cpu(), cpu[7]) and torch.equal(gpu[8].cpu(), cpu[8])
    assert bool(gpu[9]) == bool(cpu[9])


@pytest.mark.parametrize("name", sorted(ENGINE_CASES))
def test_engine_matches_the_cpu_engine(name: str) -> None:
    args = engine_args(ENGINE_CASES[name])
    assert_same_engine_fit(run_engine(args, "cuda"), run_engine(args))


def test_engine_groups_match_the_cpu_engine() -> None:
    a = engine_args(ENGINE_CASES["default"], seed=11)
    b = engine_args(ENGINE_CASES["six-isoforms"], genes=2, seed=12)
    both = [x + y if i in (0, 4, 5, 6, 7, 8) else x for i, (x, y) in enumerate(zip(a, b))]
    for group in (0, 1):
        assert_same_engine_fit(run_engine(both, "cuda", group), run_engine(both, "cpu", group))


def test_engine_early_stopping_ends_the_loop_on_the_gpu() -> None:
    args = engine_args(ENGINE_CASES["early-stop"], epochs=500)
    gpu = run_engine(args, "cuda")
    best_epoch, converged = gpu[7].cpu(), gpu[8].cpu()
    assert converged.all() and len(set(best_epoch.tolist())) > 1
    assert gpu[5].shape[0] < 500  # the history ends when the last gene stops


def test_engine_float32_reaches_the_float64_objective() -> None:
    cpu64 = run_engine(engine_args(ENGINE_CASES["default"], epochs=500))
    gpu32 = run_engine(engine_args(ENGINE_CASES["default"], epochs=500, dtype=F32), "cuda")
    assert gpu32[0].dtype == F32
    assert_close(gpu32[6].cpu(), cpu64[6], rtol=1e-4, atol=0)


def test_engine_gene_does_not_depend_on_its_batch() -> None:
    args = engine_args(ENGINE_CASES["default"], genes=6)
    batch = run_engine(args, "cuda")
    for g in (0, 5):
        alone = run_engine([[a[0][g:g + 1]] if i in (0, 4, 5, 6, 7, 8) else a
                            for i, a in enumerate(args)], "cuda")
        for a, b in zip(alone[:5], batch[:5]):
            assert_close(a[0].cpu(), b[g].cpu(), rtol=1e-8, atol=1e-8)


def test_engine_zero_epochs_and_bad_inputs() -> None:
    args = on("cuda", engine_args(ENGINE_CASES["default"], epochs=0))
    out = run_engine(args, "cuda")
    assert out[5].shape == (0, 3) and (out[7] == -1).all() and not out[8].any()
    assert torch.equal(out[0], args[4][0])
    mixed = list(args)
    mixed[1] = mixed[1].cpu()
    with pytest.raises(RuntimeError, match="`X` must be on the device of `counts`"):
        S.joint_gd_fit(*mixed)
    bad = list(args)
    bad[0] = [bad[0][0].clone()]
    bad[0][0][0, 0, 0] = -1
    bad[-1] = 3
    with pytest.raises(RuntimeError, match="negative"):
        S.joint_gd_fit(*bad)


def test_engine_opcheck_cuda() -> None:
    args = on("cuda", engine_args(ENGINE_CASES["gamma-prior"], epochs=4))
    torch.library.opcheck(torch.ops.splisosm.joint_gd_fit.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_engine_groups_on_the_gpu_are_sized_by_its_memory() -> None:
    from splisosm.glmm._runner import ENGINE_GROUP_BYTES, FitPlan, engine_group_bytes, engine_group_size
    from splisosm.spatial._build import KernelPayload

    assert engine_group_bytes(torch.device("cuda")) >= ENGINE_GROUP_BYTES
    eig = KernelPayload(eigvals=np.ones(3), eigvecs=np.zeros((100, 3)))
    on_gpu = FitPlan("glmm-full", {"fitting_method": "joint_gd"}, device="cuda")
    on_cpu = FitPlan("glmm-full", {"fitting_method": "joint_gd"})
    assert engine_group_size(on_gpu, eig, 100, 3) >= engine_group_size(on_cpu, eig, 100, 3) > 1


# ---------------------------------------------------------------------------- end to end
def du_on_both_devices(n_genes: int, side: int, seed: int, **model_kwargs):
    """DU score-test results of a simulated slide fitted on the CPU and on the GPU."""
    from splisosm import SplisosmGLMM
    from splisosm.data.simulation import simulate_isoform_data

    adata = simulate_isoform_data(n_genes=n_genes, n_isoforms=3, grid_size=(side, side),
                                  du_fraction=0.5, seed=seed)
    results = []
    for device in ("cpu", "cuda"):
        model = SplisosmGLMM(model_type="glmm-full", device=device, **model_kwargs)
        model.setup_data(adata, layer="counts", group_iso_by="gene_symbol",
                         group_gene_by_n_iso=True, design_mtx="covariate")
        model.fit(batch_size=n_genes, print_progress=False)
        model.test_differential_usage(method="score", print_progress=False)
        results.append(model.get_formatted_test_results("du"))
    cpu, gpu = results
    assert list(cpu["gene"]) == list(gpu["gene"])
    assert np.isfinite(gpu["statistic"].to_numpy(dtype=float)).all()
    return cpu, gpu


def test_glmm_on_cuda_matches_cpu() -> None:
    """A small simulated data set fitted and tested on both devices gives the same results."""
    cpu, gpu = du_on_both_devices(6, 12, 3, fitting_method="marginal_newton")
    # Both devices run to the same Laplace optimum; differences are the fits' stopping noise.
    np.testing.assert_allclose(gpu["statistic"], cpu["statistic"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(gpu["pvalue"], cpu["pvalue"], rtol=1e-3, atol=1e-6)


def test_glmm_joint_gd_on_cuda_uses_the_engine_and_matches_cpu() -> None:
    """The default pipeline (joint_gd, float32) on both devices: the same DU results up to the
    round-off that 500 float32 Adam epochs amplify (on the CPU the engine and the Python fitter
    differ by 4e-4 relative on these genes)."""
    assert engine_available(torch.device("cuda"))
    cpu, gpu = du_on_both_devices(8, 15, 5)
    np.testing.assert_allclose(gpu["statistic"], cpu["statistic"], rtol=0.02, atol=0.01)
