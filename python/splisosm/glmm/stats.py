"""Test statistics and p-value utilities for ``SplisosmGLMM``: the per-covariate score and Wald
statistics of the differential-usage test and Benjamini–Hochberg adjustment."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.stats import chi2

from splisosm.ops import fixed_effect_info

#: Ridge added to each score-test information block. splisosm 1.2.0 subtracts it instead, which
#: can make a nearly singular block indefinite; adding it keeps the block positive definite.
SCORE_JITTER = 1e-5


def bh_adjust(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values along axis 0, independently per column.

    Parameters
    ----------
    pvalues
        ``(n_tests,)`` or ``(n_tests, n_columns)`` p-values in [0, 1]; NaN allowed.

    Returns
    -------
    numpy.ndarray
        Adjusted p-values of the same shape (float64). NaNs stay NaN but count towards the
        number of tests.

    Raises
    ------
    ValueError
        If a p-value lies outside [0, 1].

    Warns
    -----
    UserWarning
        If NaN p-values are present.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    nan = np.isnan(p)
    if nan.any():
        warnings.warn(
            f"{int(nan.sum())} NaN p-values; they stay NaN in the adjusted p-values.",
            UserWarning,
            stacklevel=2,
        )
    if ((p[~nan] < 0) | (p[~nan] > 1)).any():
        raise ValueError("p-values must lie within [0, 1]")
    squeeze = p.ndim == 1
    p2 = p[:, None] if squeeze else p
    m = p2.shape[0]
    out = np.full_like(p2, np.nan)
    for j in range(p2.shape[1]):
        col = p2[:, j]
        # NaNs sort last, so the ranks of the finite values match a list that counts them in m.
        order = np.argsort(col, kind="stable")
        ranked = col[order] * m / np.arange(1, m + 1)
        ranked = np.minimum.accumulate(np.where(np.isnan(ranked), np.inf, ranked)[::-1])[::-1]
        adjusted = np.empty(m)
        adjusted[order] = np.clip(ranked, 0.0, 1.0)
        adjusted[np.isnan(col)] = np.nan
        out[:, j] = adjusted
    return out[:, 0] if squeeze else out


def chi2_pvalues(statistic: np.ndarray, df: np.ndarray | int) -> np.ndarray:
    """Upper-tail chi-square p-values ``1 - F(T; df)`` in float64 (negative ``T`` gives 1)."""
    return chi2.sf(np.asarray(statistic, dtype=np.float64), np.asarray(df, dtype=np.float64))


def chibar2_pvalues(statistic: np.ndarray, n_components: np.ndarray | int) -> np.ndarray:
    """Upper-tail p-values of the chi-bar-square law of a likelihood ratio at a boundary.

    With ``C`` variance components tested at zero (each on the edge of its parameter space),
    the likelihood-ratio statistic is asymptotically the mixture
    ``sum_k binom(C, k) 2^-C chi2(k)`` with ``chi2(0)`` the point mass at 0 (Self and Liang,
    1987), so ``T <= 0`` gives 1 and ``T > 0`` about half the plain ``chi2(C)`` tail at ``C = 1``.

    Parameters
    ----------
    statistic
        ``(G,)`` statistics.
    n_components
        ``C`` per statistic (or one for all), ``>= 1``.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` float64 p-values.
    """
    stat = np.asarray(statistic, dtype=np.float64)
    comps = np.broadcast_to(np.asarray(n_components, dtype=int), stat.shape)
    pvalue = np.ones_like(stat)
    for c in np.unique(comps):
        rows = (comps == c) & (stat > 0)
        k = np.arange(1, c + 1)
        weights = np.array([math.comb(int(c), int(i)) for i in k]) / 2.0 ** c
        pvalue[rows] = chi2.sf(stat[rows, None], k[None, :]) @ weights
    return pvalue


def _multinom_blocks(counts: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Curvature blocks ``W (G, n, q, q)`` and residuals ``(G, n, q)`` at fitted probabilities."""
    q = counts.shape[-1] - 1
    total = counts.sum(-1)
    p = probs[..., :q]
    W = total[..., None, None] * (torch.diag_embed(p) - p[..., :, None] * p[..., None, :])
    resid = counts[..., :q] - total[..., None] * p
    return W, resid


def _diagonal_blocks(info: torch.Tensor, n_factors: int, q: int) -> torch.Tensor:
    """Per-covariate ``(q, q)`` diagonal blocks ``(G, P, q, q)`` of isoform-major information."""
    G = info.shape[0]
    P1 = n_factors + 1
    # index j * (P + 1) + f  ->  axes (j, f), (k, h); keep f == h for f < P.
    grid = info.reshape(G, q, P1, q, P1)
    blocks = torch.diagonal(grid, dim1=2, dim2=4)  # (G, q, q, P1)
    return blocks.permute(0, 3, 1, 2)[:, :n_factors]


def score_statistics(design: torch.Tensor, counts: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per-covariate score statistics for models fitted without the design.

    Each covariate ``f`` is tested on its own: ``U_f = sum_s x_sf r_s`` with the residuals
    ``r_s`` of the first ``q`` isoforms, and ``I_f = sum_s x_sf^2 W_s``; no adjustment is made for
    the intercept, the random effect or the other covariates.

    Parameters
    ----------
    design
        ``(n, P)`` covariates (no intercept).
    counts
        ``(G, n, m)`` counts of genes with equal isoform count.
    probs
        ``(G, n, m)`` fitted isoform probabilities.

    Returns
    -------
    torch.Tensor
        ``(G, P)`` statistics ``U_f^T (I_f + 1e-5 I)^{-1} U_f`` using only the covariate's own
        information block.
    """
    X = design.to(torch.float64)
    W, resid = _multinom_blocks(counts.to(torch.float64), probs.to(torch.float64))
    info, score = fixed_effect_info(X, W, resid)
    G, n, q = resid.shape
    P = X.shape[1]
    blocks = _diagonal_blocks(info, P, q)
    eye = torch.eye(q, dtype=blocks.dtype, device=blocks.device)
    U = score.reshape(G, q, P + 1).transpose(1, 2)[:, :P]  # (G, P, q)
    sol = torch.linalg.solve(blocks + SCORE_JITTER * eye, U.unsqueeze(-1)).squeeze(-1)
    return (U * sol).sum(-1).to(torch.float32)


def wald_statistics(
    design: torch.Tensor, counts: torch.Tensor, probs: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """Per-covariate Wald statistics ``beta_f^T I_f beta_f`` for models fitted with the design.

    ``I_f = sum_s x_sf^2 W_s`` is the covariate's own information block (no ridge, and the joint
    information matrix is not inverted).

    Parameters
    ----------
    design, counts, probs
        As in :func:`score_statistics`, for models fitted with the design.
    beta
        ``(G, P, q)`` fitted fixed effects.

    Returns
    -------
    torch.Tensor
        ``(G, P)`` statistics.
    """
    X = design.to(torch.float64)
    W, resid = _multinom_blocks(counts.to(torch.float64), probs.to(torch.float64))
    info, _ = fixed_effect_info(X, W, resid)
    q = resid.shape[-1]
    blocks = _diagonal_blocks(info, X.shape[1], q)
    b = beta.to(torch.float64)
    return torch.einsum("gfj,gfjk,gfk->gf", b, blocks, b).to(torch.float32)
