"""Seeded simulation of spatial isoform counts from the multinomial GLMM.

Generative model, for gene ``j`` with ``m_j`` isoforms (the last one is the reference) on ``n``
spots with covariates ``X`` (``n x P``):

* logits ``eta_sj = b_j + X_s beta_j + nu_sj`` (``q_j = m_j - 1`` columns),
* each column of ``nu_j`` drawn from ``N(0, v (theta_j K + (1 - theta_j) I))`` with ``K`` the
  standardised CAR kernel of the spots (:class:`splisosm.spatial.kernel.SpatialCovKernel`),
* gene total per spot ``N_s ~ Poisson(mean_depth * depth_scale_j)``,
* counts ``Y_s ~ Multinomial(N_s, softmax([eta_s, 0]))``.

Genes with a spatial effect (``is_sv``) use ``theta_j = theta``; the others ``theta_j = 0``
(same total variance ``v``, no spatial structure), which is the null of the spatial-variability
test. Genes with differential usage (``is_du``) get non-zero ``beta_j``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from splisosm.spatial.kernel import SpatialCovKernel

__all__ = ["simulate_isoform_data"]

_COVARIATE_KINDS = ("binary", "continuous")
_COVARIATE_PATTERNS = ("random", "spatial")


def _plain(value: Any) -> Any:
    """Copy of an argument that both JSON and h5ad can store.

    Numpy scalars become Python scalars; arrays, lists and tuples become lists (h5ad has no
    encoding for tuples).
    """
    if isinstance(value, (np.generic, np.ndarray, tuple, list)):
        return np.asarray(value).tolist()
    return value


def _spot_coordinates(
    grid_size: tuple[int, int] | None, n_spots: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Rook-grid coordinates, or ``n_spots`` uniform points on a square of unit spot density."""
    if grid_size is not None and n_spots is not None:
        raise ValueError("give at most one of `grid_size` and `n_spots`")
    if n_spots is not None:
        if isinstance(n_spots, bool) or not isinstance(n_spots, numbers.Integral) or n_spots < 2:
            raise ValueError(f"`n_spots` must be an integer >= 2, got {n_spots!r}")
        return rng.uniform(0.0, np.sqrt(n_spots), size=(int(n_spots), 2))
    nx, ny = (30, 30) if grid_size is None else grid_size
    if min(nx, ny) < 1 or nx * ny < 2:
        raise ValueError(
            f"`grid_size` must hold two positive integers with at least 2 spots, got {grid_size!r}"
        )
    gx, gy = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float), indexing="ij")
    return np.column_stack([gx.ravel(), gy.ravel()])


def _covariates(
    coords: np.ndarray, n_covariates: int, kind: str, pattern: str, rng: np.random.Generator
) -> np.ndarray:
    """``(n, P)`` covariates: iid per spot (``random``) or split along a direction (``spatial``).

    The ``p``-th spatial covariate projects the coordinates on the direction at angle
    ``pi p / P``; binary ones are 1 above the median projection, continuous ones the standardised
    projection.
    """
    n = coords.shape[0]
    if pattern == "random":
        raw = rng.standard_normal((n, n_covariates))
    else:
        angles = np.pi * np.arange(n_covariates) / max(n_covariates, 1)
        raw = (coords - coords.mean(axis=0)) @ np.vstack([np.cos(angles), np.sin(angles)])
    if kind == "binary":
        return (raw > np.median(raw, axis=0)).astype(np.float64)
    return (raw - raw.mean(axis=0)) / np.maximum(raw.std(axis=0), 1e-12)


def _isoforms_per_gene(n_genes: int, n_isoforms: int | Sequence[int]) -> np.ndarray:
    counts = np.full(n_genes, n_isoforms) if np.isscalar(n_isoforms) else np.asarray(n_isoforms)
    valid = counts.shape == (n_genes,) and np.issubdtype(counts.dtype, np.integer)
    if not valid or counts.min() < 2:
        raise ValueError(
            f"`n_isoforms` must be an integer >= 2 or one such integer per gene, got {n_isoforms!r}"
        )
    return counts.astype(np.int64)


def _pick(n_genes: int, fraction: float, name: str, rng: np.random.Generator) -> np.ndarray:
    """Boolean flags for ``round(fraction * n_genes)`` genes chosen uniformly at random."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1], got {fraction}")
    flags = np.zeros(n_genes, dtype=bool)
    flags[rng.choice(n_genes, size=int(round(fraction * n_genes)), replace=False)] = True
    return flags


def simulate_isoform_data(
    n_genes: int = 100,
    n_isoforms: int | Sequence[int] = 3,
    *,
    grid_size: tuple[int, int] | None = None,
    n_spots: int | None = None,
    k_neighbors: int = 4,
    rho: float = 0.99,
    spatial_var: float = 0.5,
    theta: float = 0.5,
    sv_fraction: float = 1.0,
    n_covariates: int = 1,
    covariate: str = "binary",
    covariate_pattern: str = "random",
    du_fraction: float = 0.0,
    effect_size: float = 1.0,
    intercept_sd: float = 0.5,
    mean_depth: float = 10.0,
    depth_sd: float = 0.5,
    seed: int = 0,
) -> ad.AnnData:
    """Simulate isoform counts with spatial random effects and covariate effects.

    See the module docstring for the model. Everything random comes from one
    ``numpy.random.default_rng(seed)``, so equal arguments give identical data.

    Parameters
    ----------
    n_genes
        Number of genes.
    n_isoforms
        Isoforms per gene (``>= 2``), one integer for all genes or one per gene.
    grid_size
        ``(nx, ny)`` rook grid of spots with unit spacing. With neither ``grid_size`` nor
        ``n_spots`` a 30 x 30 grid is used.
    n_spots
        Number of spots placed uniformly at random on a square of side ``sqrt(n_spots)`` (unit
        spot density); exclusive with ``grid_size``.
    k_neighbors, rho
        Mutual k-NN graph and CAR autocorrelation of the spatial kernel ``K``.
    spatial_var
        Random-effect variance ``v`` (sigma^2).
    theta
        Spatial proportion of the variance of spatially variable genes (0: no spatial structure).
    sv_fraction
        Fraction of genes with a spatial random effect; the others use ``theta_j = 0``.
    n_covariates
        Number of covariates ``P`` (0 for none).
    covariate
        ``"binary"`` (0/1 floats, half the spots each) or ``"continuous"`` (standardised).
    covariate_pattern
        ``"random"`` (default): independent across spots, hence unconfounded with the spatial
        effect. ``"spatial"``: the slide split along a direction (left/right half for the first
        covariate), realistic for e.g. tissue regions but confounded with the smooth spatial effect.
    du_fraction
        Fraction of genes with covariate effects (differential usage).
    effect_size
        Magnitude of each covariate effect: every entry of ``beta_j`` of a DU gene is
        ``+-effect_size`` with a random sign; other genes have ``beta_j = 0``.
    intercept_sd
        Standard deviation of the intercepts ``b_j`` (drawn per non-reference isoform).
    mean_depth
        Mean gene total per spot before the per-gene depth scale.
    depth_sd
        Log-scale standard deviation of the per-gene depth scale (log-normal with mean 1).
    seed
        Seed of the random generator.

    Returns
    -------
    anndata.AnnData
        ``n_spots x sum(n_isoforms)``, writable with ``write_h5ad`` as returned:

        * ``X`` and ``layers['counts']``: dense float32 counts (two separate arrays);
        * ``obs``: index ``spot_0000`` etc.; covariates as float columns named ``covariate``
          (one covariate) or ``covariate_1``, ..., ``covariate_P`` (no columns when ``P = 0``);
        * ``obsm['spatial']``: ``(n, 2)`` float64 coordinates;
        * ``var``: one row per isoform, index ``gene_0007_iso_1`` etc. (unique); a gene's
          isoforms are contiguous, in gene order, and its last one is the reference. Columns:

          - ``gene_symbol`` (``gene_0007``) and ``transcript_id`` (same as the index);
          - ``true_intercept``: the simulated intercept ``b_j`` of each non-reference isoform;
          - ``true_beta_<name>`` for each covariate column ``<name>`` of ``obs`` (e.g.
            ``true_beta_covariate``): that covariate's simulated effect on each non-reference
            isoform, ``+-effect_size`` for DU genes and 0 otherwise.

          The truth columns are float64 and NaN on every reference isoform, whose logit is
          fixed at 0 by the model.
        * ``uns['simulation']``: the rest of the truth as plain Python (scalars, strings and
          flat lists of one type, nothing ragged):

          - ``params``: the arguments of the call. Arguments left at None (``grid_size``,
            ``n_spots``) are omitted, since h5ad cannot store None portably, so
            ``simulate_isoform_data(**params)`` reproduces the data; tuples and numpy
            values are stored as lists and Python scalars.
          - ``covariate_names``: the covariate column names, in order (empty when ``P = 0``).
          - ``genes``: per-gene lists, in gene order: ``gene_symbol``, ``n_isoforms``,
            ``is_sv``, ``is_du``, ``theta`` (``theta_j``) and ``depth_scale``.

        After a ``write_h5ad`` / ``anndata.read_h5ad`` round trip anndata returns the lists of
        ``uns`` as numpy arrays (an empty list as an empty float array) with the same values.
    """
    params = {key: _plain(value) for key, value in locals().items() if value is not None}
    if covariate not in _COVARIATE_KINDS:
        raise ValueError(f"`covariate` must be one of {_COVARIATE_KINDS}, got {covariate!r}")
    if covariate_pattern not in _COVARIATE_PATTERNS:
        raise ValueError(
            f"`covariate_pattern` must be one of {_COVARIATE_PATTERNS}, got {covariate_pattern!r}"
        )
    if n_genes < 1 or n_covariates < 0:
        raise ValueError("`n_genes` must be positive and `n_covariates` non-negative")
    if spatial_var < 0 or not 0.0 <= theta <= 1.0 or mean_depth <= 0:
        raise ValueError("need spatial_var >= 0, 0 <= theta <= 1 and mean_depth > 0")

    rng = np.random.default_rng(seed)
    coords = _spot_coordinates(grid_size, n_spots, rng)
    n = coords.shape[0]
    m_per_gene = _isoforms_per_gene(n_genes, n_isoforms)
    q_per_gene = m_per_gene - 1
    design = _covariates(coords, n_covariates, covariate, covariate_pattern, rng)
    is_sv = _pick(n_genes, sv_fraction, "sv_fraction", rng)
    is_du = _pick(n_genes, du_fraction, "du_fraction", rng)
    gene_theta = np.where(is_sv, theta, 0.0)
    depth_scale = np.exp(depth_sd * rng.standard_normal(n_genes) - 0.5 * depth_sd**2)

    # one column per non-reference isoform of every gene, in gene order
    n_cols = int(q_per_gene.sum())
    col_gene = np.repeat(np.arange(n_genes), q_per_gene)
    intercepts = intercept_sd * rng.standard_normal(n_cols)
    signs = rng.choice([-1.0, 1.0], size=(n_covariates, n_cols))
    beta = np.where(is_du[col_gene], effect_size * signs, 0.0)
    spatial = np.zeros((n, n_cols))
    if is_sv.any() and theta > 0:
        # sampling only needs the sparse precision: skip the dense kernel even for small n
        kernel = SpatialCovKernel(coords, k_neighbors=k_neighbors, rho=rho, dense_threshold=0)
        sv_cols = np.flatnonzero(is_sv[col_gene])
        spatial[:, sv_cols] = kernel.sample(sv_cols.size, rng)
    col_theta = gene_theta[col_gene]
    nu = np.sqrt(spatial_var) * (
        np.sqrt(col_theta) * spatial + np.sqrt(1.0 - col_theta) * rng.standard_normal((n, n_cols))
    )
    eta = intercepts + design @ beta + nu
    totals = rng.poisson(mean_depth * depth_scale[None, :], size=(n, n_genes))

    counts = np.empty((n, int(m_per_gene.sum())), dtype=np.float32)
    iso_start = np.r_[0, np.cumsum(m_per_gene)]
    col_start = np.r_[0, np.cumsum(q_per_gene)]
    for m in np.unique(m_per_gene):
        genes = np.flatnonzero(m_per_gene == m)
        logits = np.stack([eta[:, col_start[g] : col_start[g + 1]] for g in genes])  # (G, n, q)
        logits = np.concatenate([logits, np.zeros((genes.size, n, 1))], axis=2)
        probs = np.exp(logits - logits.max(axis=2, keepdims=True))
        probs /= probs.sum(axis=2, keepdims=True)
        draws = rng.multinomial(totals[:, genes].T, probs)  # (G, n, m)
        for g, draw in zip(genes, draws):
            counts[:, iso_start[g] : iso_start[g + 1]] = draw

    cov_names = [f"covariate_{p + 1}" for p in range(n_covariates)]
    if n_covariates == 1:
        cov_names = ["covariate"]
    obs = pd.DataFrame(design, columns=cov_names, index=[f"spot_{s:04d}" for s in range(n)])

    symbols = [f"gene_{g:04d}" for g in range(n_genes)]
    iso_names = [f"{symbols[g]}_iso_{i}" for g in range(n_genes) for i in range(m_per_gene[g])]
    var = pd.DataFrame(
        {"gene_symbol": np.repeat(symbols, m_per_gene), "transcript_id": iso_names},
        index=pd.Index(iso_names),
    )
    # the simulated columns are exactly the non-reference isoforms, in the same order
    non_reference = np.ones(len(iso_names), dtype=bool)
    non_reference[iso_start[1:] - 1] = False

    def per_isoform(values: np.ndarray) -> np.ndarray:
        out = np.full(len(iso_names), np.nan)
        out[non_reference] = values
        return out

    var["true_intercept"] = per_isoform(intercepts)
    for name, row in zip(cov_names, beta):
        var[f"true_beta_{name}"] = per_isoform(row)

    truth: dict[str, Any] = {
        "params": params,
        "covariate_names": cov_names,
        "genes": {
            "gene_symbol": symbols,
            "n_isoforms": m_per_gene.tolist(),
            "is_sv": is_sv.tolist(),
            "is_du": is_du.tolist(),
            "theta": gene_theta.tolist(),
            "depth_scale": depth_scale.tolist(),
        },
    }
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.layers["counts"] = counts.copy()
    adata.obsm["spatial"] = coords
    adata.uns["simulation"] = truth
    return adata
