"""Score tests under the marginal (random effects integrated out) GLMM.

Linearised at a mode ``(nu^, omega^)`` of the joint likelihood, the multinomial GLMM is the
Gaussian working model ``z ~ N(X0 omega, V)`` with ``V = W^-1 + Sigma`` (``W`` the per-spot
multinomial curvature, ``Sigma`` the random-effect covariance). At the mode the residuals
``r = Y - N pi`` equal ``V^-1 (z - X0 omega^)``, so they are the marginal scores, with covariance
``P = V^-1 - V^-1 X0 (X0^T V^-1 X0)^-1 X0^T V^-1`` under the null. Both tests here use this
covariance instead of the conditional ``W``, which ignores the variance that the random effect
absorbs (over-dispersion and spatial smoothness) and makes a conditional test conservative.

* Differential usage (:func:`du_marginal_score`): ``V^-1 = W - W H^-1 W`` with ``H = Sigma^-1 + W``
  the Laplace system of the fit; the covariate's score is made efficient against the intercept.
* Spatial variability (:func:`sv_score`): at the white-noise null ``Sigma = v I`` everything is
  per spot, ``V^-1 = D = W (I + v W)^-1``; the statistic ``sum_j r_j^T K r_j`` (the score of a
  spatial variance component at ``theta = 0``), compared with its expectation given the residual
  dispersion, is referred to a shifted, scaled chi-square with its first three null moments.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import chi2
from torch import Tensor

from splisosm.ops import multinom_terms

__all__ = ["ScoreTraces", "du_marginal_score", "null_mode", "score_moments", "spectral_skewness",
           "sv_score", "three_moment_sf"]

#: Ridge on information matrices that can be singular (a covariate collinear with the intercept).
INFO_RIDGE = 1e-8
#: Newton iterations and convergence tolerance (largest step) of :func:`null_mode`.
MODE_MAX_ITER = 50
MODE_TOL = 1e-9
#: Rows of ``K`` formed at a time when applying ``K o K`` (bounds memory to ``block x n``).
KERNEL_ROW_BLOCK = 512
#: Degrees of freedom above which the three-moment reference is taken as normal.
MAX_REFERENCE_DF = 1e7


def with_intercept(X: Tensor | None, n: int, like: Tensor) -> Tensor:
    """``[X, 1]`` as ``(n, P + 1)`` in the dtype and device of ``like`` (``[1]`` without ``X``)."""
    ones = torch.ones(n, 1, dtype=like.dtype, device=like.device)
    return ones if X is None else torch.cat([X.to(like), ones], dim=1)


def _kron_info(Xt: Tensor, blocks: Tensor) -> Tensor:
    """``sum_s (x_s x_s^T) (x) B_s`` as ``(G, p q, p q)``, index ``f * q + j``."""
    G, _, q, _ = blocks.shape
    p = Xt.shape[1]
    return torch.einsum("sf,sh,gsjk->gfjhk", Xt, Xt, blocks).reshape(G, p * q, p * q)


def _ridge(A: Tensor) -> Tensor:
    scale = torch.diagonal(A, dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1.0)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return A + INFO_RIDGE * scale[..., None, None] * eye


def _null_precision(W: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(W + diag(1/v))^-1 W`` and ``D = W - W (W + diag(1/v))^-1 W`` per spot."""
    M = W + torch.diag_embed(1.0 / v)[:, None]
    MinvW = torch.linalg.solve(M, W)
    return MinvW, W - W @ MinvW


def _white_noise_objective(eta: Tensor, nu: Tensor, counts: Tensor, v: Tensor) -> Tensor:
    return multinom_terms(eta, counts)[0] - 0.5 * (nu * nu / v[:, None, :]).sum((1, 2))


def null_mode(counts: Tensor, nu: Tensor, omega: Tensor, v: Tensor, Xt: Tensor
              ) -> tuple[Tensor, Tensor]:
    """Mode of the white-noise null model's joint likelihood in ``(nu, omega)`` at fixed ``v``.

    Newton's method on a concave objective, with step halving per gene; the ``nq + pq``
    system is solved through its per-spot blocks (Schur complement on the fixed effects).

    Parameters
    ----------
    counts
        ``(G, n, q + 1)`` float64 counts.
    nu, omega
        Starting random effects ``(G, n, q)`` and fixed effects ``(G, p, q)`` (rows of ``Xt``).
    v
        ``(G, q)`` random-effect variance per isoform column.
    Xt
        ``(n, p)`` fixed-effect design, intercept included.

    Returns
    -------
    nu, omega
        The mode (fitted models stop at a tolerance on their loss; the score test needs the
        stationary point).
    """
    G, n, q = nu.shape
    p = Xt.shape[1]
    nu, omega = nu.clone(), omega.clone()
    eta = nu + torch.einsum("sf,gfj->gsj", Xt, omega)
    obj = _white_noise_objective(eta, nu, counts, v)
    for _ in range(MODE_MAX_ITER):
        _, r, W = multinom_terms(eta, counts)
        g_nu = r - nu / v[:, None, :]
        g_om = torch.einsum("sf,gsj->gfj", Xt, r)
        MinvW, D = _null_precision(W, v)
        Minv_g = torch.linalg.solve(W + torch.diag_embed(1.0 / v)[:, None], g_nu.unsqueeze(-1)).squeeze(-1)
        rhs = g_om - torch.einsum("sf,gsj->gfj", Xt, (W @ Minv_g.unsqueeze(-1)).squeeze(-1))
        d_om = torch.linalg.solve(_ridge(_kron_info(Xt, D)), rhs.reshape(G, p * q)).reshape(G, p, q)
        d_fixed = torch.einsum("sf,gfj->gsj", Xt, d_om)
        d_nu = Minv_g - (MinvW @ d_fixed.unsqueeze(-1)).squeeze(-1)
        step = torch.ones(G, dtype=nu.dtype, device=nu.device)
        todo = torch.ones(G, dtype=torch.bool, device=nu.device)
        for _ in range(30):
            s = step[:, None, None]
            nu_new, om_new = nu + s * d_nu, omega + s * d_om
            eta_new = eta + s * (d_nu + d_fixed)
            obj_new = _white_noise_objective(eta_new, nu_new, counts, v)
            ok = obj_new >= obj - 1e-12 * obj.abs()
            todo = todo & ~ok
            if not bool(todo.any()):
                break
            step = torch.where(todo, 0.5 * step, step)
        keep = (~todo)[:, None, None]
        nu = torch.where(keep, nu_new, nu)
        omega = torch.where(keep, om_new, omega)
        eta = torch.where(keep, eta_new, eta)
        obj = torch.where(~todo, obj_new, obj)
        size = torch.maximum((s * d_nu).abs().flatten(1).amax(1), (s * d_om).abs().flatten(1).amax(1))
        if float(size.max()) < MODE_TOL:
            break
    return nu, omega


def _kernel_square_apply(lam: Tensor, U: Tensor, vecs: Tensor) -> Tensor:
    """``(K o K) vecs`` for ``K = U diag(lam) U^T`` (``vecs (n, c)``), ``K`` formed in row blocks."""
    n = U.shape[0]
    out = torch.empty_like(vecs)
    scaled = U * lam
    for start in range(0, n, KERNEL_ROW_BLOCK):
        stop = min(start + KERNEL_ROW_BLOCK, n)
        rows = scaled[start:stop] @ U.T
        out[start:stop] = (rows * rows) @ vecs
    return out


class ScoreTraces(NamedTuple):
    """Traces of the null covariance ``P`` of the residuals with the spatial kernel ``K``, each ``(G,)``."""

    pk: Tensor
    """``tr(P K)``."""
    pkpk: Tensor
    """``tr(P K P K)``."""
    p: Tensor
    """``tr(P)``."""
    pkp: Tensor
    """``tr(P K P)``."""
    pp: Tensor
    """``tr(P P)``."""


def score_moments(D: Tensor, Xt: Tensor, lam: Tensor, U: Tensor) -> ScoreTraces:
    """Traces that give the null moments of ``r^T (I_q (x) K) r`` and ``r^T r`` for ``r ~ N(0, P)``.

    ``P = D - B M B^T`` with ``D`` the per-spot blocks of ``V^-1``, ``B = D X0``,
    ``X0 = Xt (x) I_q`` and ``M = (X0^T D X0)^-1``; ``K = U diag(lam) U^T``.
    """
    G, n, q, _ = D.shape
    B = torch.einsum("gsjl,sf->gsjfl", D, Xt).reshape(G, n, q, -1)  # column f * q + l
    KB = torch.einsum("tk,gkjc->gtjc", U * lam, torch.einsum("sk,gsjc->gkjc", U, B))
    DB = torch.einsum("gsjk,gskc->gsjc", D, B)
    Minv = torch.linalg.inv(_ridge(_kron_info(Xt, D)))
    BB = torch.einsum("gsjc,gsjd->gcd", B, B)
    MBB = Minv @ BB
    MBKB = Minv @ torch.einsum("gsjc,gsjd->gcd", B, KB)
    MKDK = Minv @ torch.einsum("gsjc,gsjk,gskd->gcd", KB, D, KB)

    def tr(A: Tensor) -> Tensor:
        return torch.diagonal(A, dim1=1, dim2=2).sum(1)

    k_diag = (U * U) @ lam
    d_square = torch.einsum("gsjk,gsjk->gs", D, D)
    dvec = D.permute(1, 0, 2, 3).reshape(n, -1)
    tr_dkdk = (dvec * _kernel_square_apply(lam, U, dvec)).sum(0).reshape(G, q, q).sum((1, 2))
    return ScoreTraces(
        pk=torch.einsum("gsjj,s->g", D, k_diag) - tr(MBKB),
        pkpk=tr_dkdk - 2.0 * tr(MKDK) + tr(MBKB @ MBKB),
        p=torch.einsum("gsjj->g", D) - tr(MBB),
        pkp=d_square @ k_diag - 2.0 * tr(Minv @ torch.einsum("gsjc,gsjd->gcd", KB, DB))
        + tr(MBB @ MBKB),
        pp=d_square.sum(1) - 2.0 * tr(Minv @ torch.einsum("gsjc,gsjd->gcd", B, DB))
        + tr(MBB @ MBB),
    )


def spectral_skewness(lam: Tensor, n: int, shift: Tensor, D: Tensor) -> Tensor:
    """Skewness of ``r^T (I_q (x) (K - shift I)) r`` with ``r`` Gaussian, per-spot covariance ``mean_s D_s``.

    With a common spot covariance (eigenvalues ``delta_j``) the quadratic form is a weighted sum of
    chi-square(1) variables with weights ``delta_j (lam_i - shift)`` (``lam`` padded with zeros to
    ``n``), so its skewness ``sqrt(8) k3 / k2^1.5`` needs only power sums of the two spectra. The
    spot-to-spot variation of ``D_s`` and the fitted fixed effects are ignored here: the skewness
    only shapes the reference, whose mean and variance are exact.
    """
    lam_sums = [torch.sum(lam ** m) for m in range(4)]
    lam_sums[0] = torch.as_tensor(float(n), dtype=lam.dtype)
    a = shift
    w2 = lam_sums[2] - 2 * a * lam_sums[1] + a * a * lam_sums[0]
    w3 = lam_sums[3] - 3 * a * lam_sums[2] + 3 * a * a * lam_sums[1] - a ** 3 * lam_sums[0]
    delta = torch.linalg.eigvalsh(D.mean(1))
    d2, d3 = (delta ** 2).sum(1), (delta ** 3).sum(1)
    return 8.0 ** 0.5 * d3 * w3 / (d2 * w2) ** 1.5


def three_moment_sf(z: np.ndarray, skewness: np.ndarray) -> np.ndarray:
    """Upper tail at the standardised value ``z`` of the shifted, scaled chi-square with that skewness.

    ``chi2(df)`` with ``df = 8 / skewness^2``, standardised (mirrored for a negative skewness);
    the normal tail where the skewness is too small for a finite ``df`` to matter.
    """
    z, skewness = np.broadcast_arrays(np.asarray(z, float), np.asarray(skewness, float))
    df = 8.0 / np.maximum(skewness * skewness, 8.0 / MAX_REFERENCE_DF)
    shift = np.sqrt(2.0 * df) * z
    return np.where(skewness >= 0, chi2.sf(df + shift, df), chi2.cdf(df - shift, df))


def sv_score(counts: Tensor, nu: Tensor, omega: Tensor, v: Tensor, Xt: Tensor,
             lam: Tensor, U: Tensor) -> dict[str, np.ndarray]:
    """Score test of ``theta = 0`` from fitted white-noise null models of one isoform count.

    Parameters
    ----------
    counts, nu, omega, v, Xt
        As in :func:`null_mode`, with ``(nu, omega)`` at the mode (its result): the residuals
        are marginal scores only there.
    lam, U
        Kernel eigenpairs ``(r,)``, ``(n, r)``; the spatial kernel of the test is
        ``U diag(lam) U^T`` (the exact kernel at full rank).

    Returns
    -------
    dict
        ``statistic`` ``Q = sum_j r_j^T K r_j``; its null ``mean`` given the residual dispersion
        ``phi``; the null ``variance`` and ``skewness`` of ``Q - mean``; and the ``pvalue`` from
        the shifted, scaled chi-square with those three moments; arrays ``(G,)``.
    """
    eta = nu + torch.einsum("sf,gfj->gsj", Xt, omega)
    _, r, W = multinom_terms(eta, counts)
    _, D = _null_precision(W, v)
    z = torch.einsum("sk,gsj->gkj", U, r)
    stat = (lam[None, :, None] * z * z).sum((1, 2))
    t = score_moments(D, Xt, lam, U)
    # At a mode the random effect has absorbed part of each spot's noise, so the linearised
    # covariance overstates the residual variance (by 1 % to 25 % at ~10 counts per spot); its
    # scale is estimated from the residuals themselves, as a quasi-likelihood dispersion
    # phi = S / tr(P) with S = r^T r. The test then compares Q with its expectation given that
    # estimate, a S with a = tr(PK) / tr(P): Q - a S = r^T (K - a I) r has mean 0 and variance
    # 2 tr(P (K - a) P (K - a)), free of the scale up to phi^2. Its distribution is skewed (a few
    # large kernel eigenvalues against many small ones), so a two-moment (normal or Satterthwaite)
    # reference puts too much mass below the mean and too little in the upper tail.
    resid_sq = (r * r).sum((1, 2))
    phi = resid_sq / t.p
    a = t.pk / t.p
    var = phi * phi * 2.0 * (t.pkpk - 2.0 * a * t.pkp + a * a * t.pp)
    skew = spectral_skewness(lam, U.shape[0], a, D)
    mean = a * resid_sq
    stat, mean, var, skew, phi = (x.cpu().numpy() for x in (stat, mean, var, skew, phi))
    return {"statistic": stat, "mean": mean, "variance": var, "skewness": skew, "phi": phi,
            "pvalue": three_moment_sf((stat - mean) / np.sqrt(var), skew)}


def du_marginal_score(X: Tensor, counts: Tensor, nu: Tensor, fixed_eta: Tensor, v: Tensor | None,
                      theta: Tensor | None, system) -> Tensor:
    """Per-covariate marginal score statistics for models fitted without the design.

    Parameters
    ----------
    X
        ``(n, P)`` covariates (no intercept).
    counts
        ``(G, n, q + 1)`` float64 counts.
    nu, fixed_eta
        Fitted random effects and ``1 bias^T`` (``(G, n, q)``); ``nu`` is zero for a GLM.
    v, theta, system
        Variance components ``(G, q)`` and the model's Laplace system; ``system=None`` for a GLM
        (no random effect: the marginal information is ``X^T W X``).

    Returns
    -------
    torch.Tensor
        ``(G, P)`` float64 statistics ``U_f^T I_f^-1 U_f`` with the score ``U_f`` and information
        ``I_f`` of covariate ``f`` made efficient against the intercept; chi-square with ``q``
        degrees of freedom under the null.
    """
    _, r, W = multinom_terms(nu + fixed_eta, counts)
    G, n, q = r.shape
    Xt = with_intercept(X, n, r)
    p = Xt.shape[1]
    info = _kron_info(Xt, W)
    if system is not None:
        WY = torch.einsum("gsjl,sf->gflsj", W, Xt).reshape(G, p * q, n, q)
        info = info - torch.einsum("grsj,gtsj->grt", WY, system.solve(W, WY, v, theta))
    info = 0.5 * (info + info.transpose(1, 2))
    grid = info.reshape(G, p, q, p, q)
    score = torch.einsum("sf,gsj->gfj", Xt, r)
    I00 = grid[:, -1, :, -1, :]
    IF0 = grid[:, :-1, :, -1, :]  # (G, P, q, q)
    IFF = torch.diagonal(grid[:, :-1, :, :-1, :], dim1=1, dim2=3).permute(0, 3, 1, 2)
    S = torch.linalg.solve(_ridge(I00)[:, None], IF0.transpose(-1, -2))  # I00^-1 I0F
    eff_info = IFF - IF0 @ S
    eff_score = score[:, :-1] - torch.einsum("gfkj,gk->gfj", S, score[:, -1])
    sol = torch.linalg.solve(_ridge(eff_info), eff_score.unsqueeze(-1)).squeeze(-1)
    return (eff_score * sol).sum(-1)
