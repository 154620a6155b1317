"""Pure-torch, dense, readable restatements of the GLMM/GLM objectives and fitters (SPEC §5-6).

These are the parity targets of the fast models: one gene at a time, dense ``n x n`` covariances,
dense ``nq x nq`` Hessians from autograd, no shared code with the package beyond torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def car_kernel(side: int, rho: float = 0.9) -> np.ndarray:
    """Standardised CAR covariance on a ``side x side`` rook grid (unit diagonal), float64."""
    n = side * side
    A = np.zeros((n, n))
    for i in range(side):
        for j in range(side):
            s = i * side + j
            if i + 1 < side:
                A[s, s + side] = A[s + side, s] = 1
            if j + 1 < side:
                A[s, s + 1] = A[s + 1, s] = 1
    d = np.maximum(A.sum(1), 1e-12)
    M = np.eye(n) - rho * A / np.sqrt(np.outer(d, d))
    K = np.linalg.inv(M)
    k = np.sqrt(np.diag(K))
    return K / np.outer(k, k)


def roundoff_precision(K: np.ndarray):
    """``K^-1`` as CSR with the round-off of a dense inversion made deliberate and one-sided.

    Which entries of a numerically inverted kernel come out as exact zeros depends on the
    machine's BLAS kernels. Here the structural zeros are dropped, then one entry far below
    round-off is stored on one side only and one explicit zero is stored on one side only, so a
    test using this matrix exercises that case on every machine.
    """
    import scipy.sparse as sp

    P = np.linalg.inv(K)
    P[np.abs(P) < 1e-10 * np.abs(P).max()] = 0.0
    P = (P + P.T) / 2
    rows, cols = np.nonzero(P)
    data = list(P[rows, cols])
    zeros = np.argwhere(P == 0)
    (i, j), (k, m) = zeros[0], zeros[len(zeros) // 2]
    rows, cols = list(rows) + [i, k], list(cols) + [j, m]
    data += [1e-18 * np.abs(P).max(), 0.0]
    out = sp.csr_matrix((data, (rows, cols)), shape=P.shape)
    assert (out != out.T).nnz == 2 and out.nnz == np.count_nonzero(P) + 2
    return out


def simulate_counts(K: np.ndarray, n_genes: int, m: int, *, sigma: float = 0.7,
                    theta: float = 0.5, depth: float = 20.0, seed: int = 0) -> Tensor:
    """Counts ``(G, n, m)`` from the GLMM with covariance ``sigma^2 (theta K + (1-theta) I)``."""
    rng = np.random.default_rng(seed)
    n = K.shape[0]
    L = np.linalg.cholesky(sigma**2 * (theta * K + (1 - theta) * np.eye(n)))
    out = np.zeros((n_genes, n, m))
    for g in range(n_genes):
        eta = np.concatenate([L @ rng.standard_normal((n, m - 1)), np.zeros((n, 1))], 1)
        p = np.exp(eta - eta.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        N = rng.poisson(depth, n)
        out[g] = np.stack([rng.multinomial(N[s], p[s]) for s in range(n)])
    return torch.from_numpy(out)


def multinom_loglik(eta: Tensor, Y: Tensor) -> Tensor:
    """``l_mult`` of one gene (constants included); ``eta (n, q)``, ``Y (n, m)``."""
    logp = torch.log_softmax(torch.cat([eta, torch.zeros_like(eta[:, :1])], 1), 1)
    N = Y.sum(1)
    return (torch.lgamma(N + 1) - torch.lgamma(Y + 1).sum(1) + (Y * logp).sum(1)).sum()


def covariance(v: Tensor, theta: Tensor, K: Tensor | None, U: Tensor | None = None,
               lam: Tensor | None = None) -> Tensor:
    """Dense ``Sigma = v (theta K + (1 - theta) I)``; with eigenpairs ``(lam, U)`` of rank
    ``r < n`` the low-rank model ``U diag(c) U^T + d (I - U U^T)``."""
    if U is None:
        n = K.shape[0]
        return v * (theta * K + (1 - theta) * torch.eye(n, dtype=K.dtype))
    n = U.shape[0]
    c = v * (theta * lam + 1 - theta)
    d = v * (1 - theta)
    return U @ torch.diag(c) @ U.T + d * (torch.eye(n, dtype=U.dtype) - U @ U.T)


def log_prior(sigma: Tensor, model: str, params: dict) -> Tensor:
    if model == "none":
        return sigma.new_zeros(())
    a, b = params["alpha"], params["beta"]
    if model == "gamma":
        s = sigma.abs().clamp(min=0.1)
        return (a * math.log(b) - math.lgamma(a) + (a - 1) * torch.log(s) - b * s).sum()
    v = (sigma**2).clamp(min=0.01)
    return (a * math.log(b) - math.lgamma(a) - (a + 1) * torch.log(v) - b / v).sum()


def joint_loglik(Y, X, nu, beta, bias, sigma, theta_logit, *, K=None, U=None, lam=None,
                 prior="none", prior_params=None) -> Tensor:
    """``l_J`` of one gene: multinomial + one Gaussian per isoform column + prior."""
    q = nu.shape[1]
    eta = nu + X @ beta + bias
    total = multinom_loglik(eta, Y)
    v = (sigma**2).clamp(min=0.01).expand(q)
    theta = torch.sigmoid(theta_logit).expand(q)
    for j in range(q):
        S = covariance(v[j], theta[j], K, U, lam)
        mvn = torch.distributions.MultivariateNormal(torch.zeros_like(nu[:, j]), S)
        total = total + mvn.log_prob(nu[:, j])
    return total + log_prior(sigma, prior, prior_params or {})


def marginal_loglik(Y, X, nu, beta, bias, sigma, theta_logit, **kw) -> Tensor:
    """``l_M = l_J - 1/2 log det(-d2 l_J / d nu2)`` with the Hessian from autograd."""
    n, q = nu.shape

    def f(flat):
        return joint_loglik(Y, X, flat.reshape(q, n).T, beta, bias, sigma, theta_logit, **kw)

    flat = nu.T.reshape(-1)
    H = torch.autograd.functional.hessian(f, flat, create_graph=True)
    return f(flat) - 0.5 * torch.logdet(-H)


def fit_gd(objective, params: dict[str, Tensor], trainable: list[str], *, lr: float,
           epochs: int, optim: str = "adam") -> list[dict[str, Tensor]]:
    """Adam/SGD on ``-objective(params)`` for a fixed number of epochs; parameter history."""
    params = {k: p.clone().requires_grad_(k in trainable) for k, p in params.items()}
    opt_params = [params[k] for k in trainable]
    opt = (torch.optim.Adam(opt_params, lr=lr) if optim == "adam"
           else torch.optim.SGD(opt_params, lr=lr))
    history = []
    for _ in range(epochs):
        opt.zero_grad()
        loss = -objective(params)
        loss.backward()
        opt.step()
        history.append({k: p.detach().clone() for k, p in params.items()})
    return history


def newton_mode(Y, X, nu, beta, bias, sigma, theta_logit, *, iters: int = 50, **kw):
    """Mode of ``l_J`` in ``(nu, beta, bias)`` by dense damped Newton (autograd Hessian)."""
    n, q = nu.shape
    P = X.shape[1]
    sizes = [n * q, P * q, q]

    def unpack(x):
        a, b, c = torch.split(x, sizes)
        return a.reshape(n, q), b.reshape(P, q), c

    def f(x):
        return joint_loglik(Y, X, *unpack(x), sigma, theta_logit, **kw)

    x = torch.cat([nu.reshape(-1), beta.reshape(-1), bias.reshape(-1)]).detach()
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(f, x)
        H = torch.autograd.functional.hessian(f, x)
        step = torch.linalg.solve(-H, g)
        t, f0 = 1.0, f(x)
        while f(x + t * step) < f0 and t > 1e-6:
            t /= 2
        x = x + t * step
        if g.abs().max() < 1e-9:
            break
    return unpack(x)


def profile_marginal(Y, X, nu, beta, bias, sigma, theta_logit, **kw) -> Tensor:
    """Laplace marginal at the mode for given variance parameters."""
    mode = newton_mode(Y, X, nu, beta, bias, sigma, theta_logit, **kw)
    with torch.no_grad():
        return marginal_loglik(Y, X, *mode, sigma, theta_logit, **kw)


def golden_max(f, lo: float, hi: float, tol: float = 1e-4) -> tuple[float, float]:
    """Golden-section maximisation of a scalar function on ``[lo, hi]``."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc > fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    x = (a + b) / 2
    return x, f(x)


def glm_fit(Y: Tensor, X: Tensor, iters: int = 100) -> Tensor:
    """Maximum multinomial log-likelihood of the GLM by dense Newton (autograd)."""
    n, m = Y.shape
    q, P = m - 1, X.shape[1]
    Xt = torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], 1)

    def f(w):
        return multinom_loglik(Xt @ w.reshape(P + 1, q), Y)

    w = torch.zeros((P + 1) * q, dtype=Y.dtype)
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(f, w)
        H = torch.autograd.functional.hessian(f, w)
        w = w + torch.linalg.solve(-H, g)
        if g.abs().max() < 1e-10:
            break
    return f(w)
