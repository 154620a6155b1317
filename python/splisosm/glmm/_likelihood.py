"""Likelihood pieces shared by the GLMM fitters: covariance parametrisation and variance priors.

Column ``j`` of the random effect has covariance ``Sigma_j = v (theta K + (1 - theta) I)`` with
total variance ``v = max(sigma^2, 0.01)`` and spatial proportion ``theta = sigmoid(theta_logit)``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

MIN_VARIANCE = 0.01
#: theta stays below 1 (Sigma would lose its white-noise part); float32 sigmoid rounds to exactly
#: 1 for logits above ~17.
MAX_THETA = 1 - 1e-6
LOW_VARIANCE_WARNING = "Total variance close to zero (sigma^2 < 0.01); clamped at 0.01."


def variance_components(sigma: Tensor, theta_logit: Tensor, q: int, *, warn: bool = True
                        ) -> tuple[Tensor, Tensor]:
    """``v = max(sigma^2, 0.01)`` and ``theta = sigmoid(theta_logit)`` expanded to ``(G, q)``.

    ``sigma``/``theta_logit`` are ``(G, C)`` with ``C`` 1 (shared) or ``q``. A ``UserWarning`` is
    emitted on every evaluation where any ``sigma^2`` is below the floor, as in splisosm 1.2.0.
    """
    sq = sigma * sigma
    if warn and bool((sq < MIN_VARIANCE).any()):
        warnings.warn(LOW_VARIANCE_WARNING, UserWarning, stacklevel=3)
    v = sq.clamp(min=MIN_VARIANCE)
    theta = torch.sigmoid(theta_logit).clamp(max=MAX_THETA)
    G = sigma.shape[0]
    return v.expand(G, q), theta.expand(G, q)


def log_prior(sigma: Tensor, model: str, params: dict) -> Tensor:
    """Summed log prior density over the variance components, ``(G,)``.

    ``gamma`` acts on ``max(|sigma|, 0.1)`` with shape ``alpha`` and rate ``beta``;
    ``inv_gamma`` on ``v = max(sigma^2, 0.01)`` with shape ``alpha`` and scale ``beta``.
    """
    if model == "none":
        return sigma.new_zeros(sigma.shape[0])
    alpha, beta = params["alpha"], params["beta"]
    const = alpha * math.log(beta) - math.lgamma(alpha)
    if model == "gamma":
        s = sigma.abs().clamp(min=0.1)
        dens = const + (alpha - 1) * torch.log(s) - beta * s
    else:
        v = (sigma * sigma).clamp(min=MIN_VARIANCE)
        dens = const - (alpha + 1) * torch.log(v) - beta / v
    return dens.sum(-1)


def gaussian_loglik(quad: Tensor, logdet_sigma: Tensor, n: int, q: int) -> Tensor:
    """``sum_j l_MVN(nu_j) = -1/2 [n q log 2 pi + log det Sigma + nu^T Sigma^-1 nu]``."""
    return -0.5 * (n * q * math.log(2 * math.pi) + logdet_sigma + quad)


def _gene_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _nonfinite_genes(*tensors: Tensor) -> Tensor:
    """``(G,)`` mask of genes with any non-finite entry in any of the tensors."""
    bad = None
    for t in tensors:
        b = ~torch.isfinite(t.detach()).flatten(1).all(1)
        bad = b if bad is None else bad | b
    return bad


class GuardedSystem:
    """Wraps a Laplace system so that a gene with non-finite inputs yields NaN outputs.

    The structured systems validate their inputs for the whole batch; one diverged gene (NaN
    parameters) must not abort the batch, so its inputs are replaced by harmless values and
    its outputs by NaN, which the training loop then reports for that gene only.
    """

    def __init__(self, inner) -> None:
        self.inner = inner

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def route(self) -> str:
        return self.inner.route

    @staticmethod
    def _clean(bad: Tensor, v: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return (torch.where(_gene_mask(bad, v), torch.ones_like(v), v),
                torch.where(_gene_mask(bad, theta), torch.zeros_like(theta), theta))

    @staticmethod
    def _poison(bad: Tensor, x: Tensor) -> Tensor:
        return torch.where(_gene_mask(bad, x), torch.full_like(x, float("nan")), x)

    def prior_terms(
        self, nu: Tensor, v: Tensor, theta: Tensor, with_precision: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        bad = _nonfinite_genes(nu, v, theta)
        v, theta = self._clean(bad, v, theta)
        nu = torch.where(_gene_mask(bad, nu), torch.zeros_like(nu), nu)
        terms = self.inner.prior_terms(nu, v, theta, with_precision=with_precision)
        return tuple(None if x is None else self._poison(bad, x) for x in terms)

    def _clean_w(self, W: Tensor, v: Tensor, theta: Tensor):
        bad = _nonfinite_genes(W, v, theta)
        v, theta = self._clean(bad, v, theta)
        W = torch.where(_gene_mask(bad, W), torch.zeros_like(W), W)
        return bad, W, v, theta

    def logdet(self, W: Tensor, v: Tensor, theta: Tensor) -> Tensor:
        bad, W, v, theta = self._clean_w(W, v, theta)
        return self._poison(bad, self.inner.logdet(W, v, theta))

    def solve(self, W: Tensor, rhs: Tensor, v: Tensor, theta: Tensor) -> Tensor:
        bad, W, v, theta = self._clean_w(W, v, theta)
        bad = bad | _nonfinite_genes(rhs)
        rhs = torch.where(_gene_mask(bad, rhs), torch.zeros_like(rhs), rhs)
        return self._poison(bad, self.inner.solve(W, rhs, v, theta))
