"""LaplaceSystem on every route against dense float64 formulas (SPEC §5.3-5.7)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.laplace_inputs import F64, car_kernel, random_W, rel
from splisosm.glmm._sparse_prior import ShiftedTraces, shifted_traces, sparse_prior_terms
from splisosm.glmm.laplace import NULL_THETA, LaplaceSystem
from splisosm.ops import laplace_reference as ref
from splisosm.ops import sparse_shifted_solve

G, Q = 3, 2
KER = car_kernel(6, 6)
N = KER["n"]
LOW_RANK = 12


def _systems() -> dict[str, LaplaceSystem]:
    lam, V = KER["evals"], KER["evecs"]
    return {
        "eigen_full": LaplaceSystem(N, evals=lam, evecs=V),
        "eigen_low": LaplaceSystem(N, evals=lam[:LOW_RANK], evecs=V[:, :LOW_RANK]),
        "sparse_full": LaplaceSystem(N, evals=lam, evecs=V, precision=KER["Q"]),
        "sparse_only": LaplaceSystem(N, precision=KER["Q"]),
        "identity": LaplaceSystem(N, identity=True),
    }


SYSTEMS = _systems()


def dense_sigma(name: str, v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Prior covariance Sigma_j (G, q, n, n) that the route is meant to implement."""
    eye = torch.eye(N, dtype=F64)
    if name == "identity":
        return v[..., None, None] * eye
    if name == "eigen_low":
        V, lam = KER["evecs"][:, :LOW_RANK], KER["evals"][:LOW_RANK]
        c, d = ref.prior_eigenvalues(lam, v, theta)
        proj = V @ V.T
        low = torch.einsum("sk,gjk,tk->gjst", V, c, V)
        return low + d[..., None, None] * (eye - proj)
    K = KER["K"]
    return v[..., None, None] * (theta[..., None, None] * K + (1 - theta[..., None, None]) * eye)


def inputs(seed: int, theta: float = 0.5, shared: bool = False):
    gen = torch.Generator().manual_seed(seed)
    W = random_W(G, N, Q, gen)
    rhs = torch.randn(G, 2, N, Q, dtype=F64, generator=gen)
    nu = torch.randn(G, N, Q, dtype=F64, generator=gen)
    v = 0.3 + torch.rand(G, 1 if shared else Q, dtype=F64, generator=gen)
    t = theta * (0.8 + 0.4 * torch.rand(G, 1 if shared else Q, dtype=F64, generator=gen))
    return W, rhs, nu, v.expand(G, Q).contiguous(), t.clamp(max=0.999).expand(G, Q).contiguous()


@pytest.mark.parametrize("name", list(SYSTEMS))
@pytest.mark.parametrize("theta", [1e-3, 0.5, 0.999])
@pytest.mark.parametrize("shared", [False, True])
def test_solve_logdet_prior_terms(name: str, theta: float, shared: bool) -> None:
    system = SYSTEMS[name]
    W, rhs, nu, v, t = inputs(int(theta * 1000) + len(name), theta, shared)
    sigma = dense_sigma(name, v, t)
    prec = torch.linalg.inv(sigma)
    if name == "eigen_low":  # the Hessian uses the clipped low-rank precision (SPEC §5.5)
        prec = ref.eig_prior_precision(KER["evals"][:LOW_RANK], KER["evecs"][:, :LOW_RANK], v, t)
    x_ref, ld_ref = ref.dense_solve_logdet(ref.dense_hessian(prec, W), rhs)
    x, ld = system.solve_logdet(W, rhs, v, t)
    assert rel(x, x_ref) < 1e-8 and rel(ld, ld_ref) < 1e-8
    assert rel(system.solve(W, rhs[:, 0], v, t), x_ref[:, 0]) < 1e-8
    assert rel(system.logdet(W, v, t), ld_ref) < 1e-8

    quad, logdet_sigma, prec_nu = system.prior_terms(nu, v, t)
    sig_inv = torch.linalg.inv(sigma)
    prec_nu_ref = torch.einsum("gjst,gtj->gsj", sig_inv, nu)
    assert rel(prec_nu, prec_nu_ref) < 1e-8
    assert rel(quad, (nu * prec_nu_ref).sum((1, 2))) < 1e-8
    assert rel(logdet_sigma, torch.logdet(sigma).sum(1)) < 1e-8


def test_low_rank_lmvn_matches_spec_formula() -> None:
    _, _, nu, v, t = inputs(11)
    system = SYSTEMS["eigen_low"]
    quad, logdet_sigma, _ = system.prior_terms(nu, v, t)
    lmvn = -0.5 * (N * Q * math.log(2 * math.pi) + logdet_sigma + quad)
    V, lam = KER["evecs"][:, :LOW_RANK], KER["evals"][:LOW_RANK]
    c, d = ref.prior_eigenvalues(lam, v, t)
    z = torch.einsum("sk,gsj->gjk", V, nu)
    spec = -0.5 * (
        N * math.log(2 * math.pi)
        + torch.log(c).sum(-1)
        + (N - LOW_RANK) * torch.log(d)
        + (nu * nu).sum(1) / d
        + ((1 / c - 1 / d[..., None]) * z**2).sum(-1)
    ).sum(1)
    assert rel(lmvn, spec) < 1e-12


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_null_theta_uses_white_prior(name: str) -> None:
    W, rhs, nu, v, _ = inputs(5)
    t = torch.full((G, Q), NULL_THETA / 10, dtype=F64)
    system = SYSTEMS[name]
    x, ld = system.solve_logdet(W, rhs, v, t)
    x_id, ld_id = SYSTEMS["identity"].solve_logdet(W, rhs, v, t)
    assert torch.equal(x, x_id) and torch.equal(ld, ld_id)
    quad, logdet_sigma, prec = system.prior_terms(nu, v, t)
    assert rel(prec, nu / v[:, None, :]) < 1e-14
    assert rel(logdet_sigma, N * torch.log(v).sum(1)) < 1e-14


@pytest.mark.parametrize("name", list(SYSTEMS))
@pytest.mark.parametrize("shared", [False, True])
def test_prior_terms_gradcheck(name: str, shared: bool) -> None:
    _, _, nu, v, t = inputs(7, shared=shared)
    sl = slice(0, 2)
    nu, v, t = (x[sl].clone().requires_grad_(True) for x in (nu, v, t))
    system = SYSTEMS[name]
    # the precision-only form gives no gradient of Sigma^-1 nu (its own product is detached)
    n_out = 2 if name == "sparse_only" else 3
    assert torch.autograd.gradcheck(lambda a, b, c: system.prior_terms(a, b, c)[:n_out],
                                    (nu, v, t))
    quad, _, prec = system.prior_terms(nu, v, t)
    (grad,) = torch.autograd.grad(quad.sum(), nu)
    assert rel(grad, 2 * prec.detach()) < 1e-12


def dense_logdet(name: str, W: torch.Tensor, v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``log det H`` from the dense Hessian of the prior the route implements (autograd-able)."""
    if name == "eigen_low":
        prec = ref.eig_prior_precision(KER["evals"][:LOW_RANK], KER["evecs"][:, :LOW_RANK], v, theta)
    else:
        prec = torch.linalg.inv(dense_sigma(name, v, theta))
    return torch.logdet(ref.dense_hessian(prec, W))


@pytest.mark.parametrize("name", list(SYSTEMS))
@pytest.mark.parametrize("theta", [1e-3, 0.5, 0.999])
def test_logdet_gradients_match_dense_autograd(name: str, theta: float) -> None:
    W, _, _, v, t = inputs(17 + int(theta * 10), theta)
    system = SYSTEMS[name]
    got_in = [x.clone().requires_grad_(True) for x in (W, v, t)]
    want_in = [x.clone().requires_grad_(True) for x in (W, v, t)]
    ld = system.logdet(*got_in)
    ld_ref = dense_logdet(name, *want_in)
    assert rel(ld.detach(), ld_ref.detach()) < 1e-10
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=F64)  # distinct per-gene upstream gradients
    got = torch.autograd.grad((weights * ld).sum(), got_in, allow_unused=True)
    want = torch.autograd.grad((weights * ld_ref).sum(), want_in, allow_unused=True)
    sym = lambda g: (g + g.transpose(-1, -2)) / 2  # noqa: E731  only W's symmetric part acts
    assert rel(sym(got[0]), sym(want[0])) < 1e-8, "d/dW"
    assert rel(got[1], want[1]) < 1e-8, "d/dv"
    if name == "identity":
        assert got[2] is None or float(got[2].abs().max()) == 0.0
    else:
        assert rel(got[2], want[2]) < 1e-7, "d/dtheta"


def test_logdet_without_gradients_is_detached() -> None:
    W, _, _, v, t = inputs(23)
    W.requires_grad_(True)
    with torch.no_grad():
        assert not SYSTEMS["sparse_full"].logdet(W, v, t).requires_grad
    assert SYSTEMS["sparse_full"].logdet(W, v, t).requires_grad


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_float32_in_float32_out(name: str) -> None:
    W, rhs, nu, v, t = inputs(9, shared=True)
    system = SYSTEMS[name]
    x, ld = system.solve_logdet(W.float(), rhs.float(), v.float(), t.float())
    x64, ld64 = system.solve_logdet(W, rhs, v, t)
    assert x.dtype == ld.dtype == torch.float32
    assert rel(x.double(), x64) < 1e-5 and rel(ld.double(), ld64) < 1e-6
    terms = system.prior_terms(nu.float(), v.float(), t.float())
    assert all(term.dtype == torch.float32 for term in terms)


def test_rank_route_and_bad_arguments() -> None:
    assert SYSTEMS["eigen_low"].rank == LOW_RANK and SYSTEMS["eigen_low"].route == "eigen"
    assert SYSTEMS["sparse_full"].rank == N and SYSTEMS["sparse_full"].route == "sparse"
    assert SYSTEMS["sparse_only"].rank is None and SYSTEMS["identity"].route == "identity"
    with pytest.raises(ValueError, match="give eigenpairs"):
        LaplaceSystem(N)
    with pytest.raises(ValueError, match="`evecs`"):
        LaplaceSystem(N, evals=KER["evals"], evecs=KER["evecs"][:5])
    with pytest.raises(ValueError, match="`precision`"):
        LaplaceSystem(N + 1, precision=KER["Q"])
    W, rhs, nu, v, t = inputs(3)
    system = SYSTEMS["eigen_full"]
    with pytest.raises(ValueError, match="`theta`"):
        system.solve(W, rhs, v, torch.ones_like(t))
    with pytest.raises(ValueError, match="`v`"):
        system.logdet(W, v[:, :1], t)
    with pytest.raises(ValueError, match="`rhs`"):
        system.solve(W, rhs[..., :1], v, t)
    with pytest.raises(ValueError, match="`nu`"):
        system.prior_terms(nu[:, :5], v, t)


def test_saturated_theta_in_prior_terms() -> None:
    _, _, nu, v, _ = inputs(13)
    t = torch.ones(G, Q, dtype=F64)
    quad, logdet_sigma, prec = SYSTEMS["eigen_full"].prior_terms(nu, v, t)
    sigma = v[..., None, None] * KER["K"]
    assert rel(logdet_sigma, torch.logdet(sigma).sum(1)) < 1e-8
    assert rel(prec, torch.einsum("gjst,gtj->gsj", torch.linalg.inv(sigma), nu)) < 1e-8
    with pytest.raises(ValueError, match="`theta`"):
        SYSTEMS["eigen_low"].prior_terms(nu, v, t)


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_prior_terms_without_precision_product(name: str) -> None:
    _, _, nu, v, t = inputs(11)
    full = SYSTEMS[name].prior_terms(nu, v, t)
    quad, logdet, prec = SYSTEMS[name].prior_terms(nu, v, t, with_precision=False)
    assert rel(quad, full[0]) < 1e-12 and rel(logdet, full[1]) < 1e-12
    if SYSTEMS[name].rank is not None and name != "identity":
        assert prec is None  # eigenbasis prior: skipped, it would cost a product with V
    else:
        assert rel(prec, full[2]) < 1e-12  # free by-product of the other routes


def test_shifted_traces_match_selected_inversion() -> None:
    """The tabulated tr (a Q + tau I)^-1 of the precision-only gradients against the exact trace
    of a factorisation, inside the tabulated range of theta / (1 - theta) and beyond it."""
    ker = car_kernel(30, 30)
    csr = ker["csr"]
    table = shifted_traces(csr)
    assert shifted_traces(tuple(t.clone() for t in csr)) is table  # once per matrix
    gen = torch.Generator().manual_seed(5)
    a = 0.2 + 5 * torch.rand(40, dtype=F64, generator=gen)
    odds = torch.exp(torch.linspace(-9.0, 9.0, 40, dtype=F64))  # tau / a, past the table's span
    tau = a * odds
    want = sparse_shifted_solve(*csr, a, tau, torch.zeros(40, 0, ker["n"], dtype=F64),
                                trace_inverse=True)[2]
    got = table(a, tau)
    err = ((got - want).abs() / want).max()
    assert float(err) < 1e-11
    inside = odds.log().abs() <= ShiftedTraces.SPAN
    assert bool(inside.any()) and bool((~inside).any())
    other = (csr[0], csr[1], 2 * csr[2])
    assert shifted_traces(other) is not table


@pytest.mark.parametrize("shared", [False, True])
def test_opcheck_sparse_prior_terms(shared: bool) -> None:
    """The precision-only prior terms are the op splisosm::sparse_prior_terms: opcheck (schema,
    fake kernel, autograd registration, AOT) and gradcheck of quad and log det Sigma in float64;
    ``shared`` takes the one-factor-per-gene branch."""
    _, _, nu, v, t = inputs(31, shared=shared)
    csr = KER["csr"]
    coef = shifted_traces(csr).coefficients
    a, tau = 1 / (v * t), 1 / (v * (1 - t))
    nu, a, tau = (x.clone().requires_grad_(True) for x in (nu, a, tau))
    op = torch.ops.splisosm.sparse_prior_terms
    for args in ((nu, a, tau, *csr, 0.25, coef), (nu, a.detach(), tau.detach(), *csr, 0.25, None)):
        result = torch.library.opcheck(op, args)
        assert result["test_autograd_registration"] == "SUCCESS"
    assert torch.autograd.gradcheck(
        lambda x, y, z: sparse_prior_terms(x, y, z, *csr, 0.25, coef)[:2], (nu, a, tau))
    quad, logdet, prec, y, trace = sparse_prior_terms(nu, a, tau, *csr, 0.25, coef)
    assert not any(x.requires_grad for x in (prec, y, trace)) and trace.shape == (G, Q)
    # the derivatives in a and tau need the trace table
    quad, _, _, _, trace = sparse_prior_terms(nu, a, tau, *csr, 0.25, None)
    assert trace.shape == (0,)
    with pytest.raises(RuntimeError, match="trace_coef"):
        quad.sum().backward()

