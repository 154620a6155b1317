"""Calibration and power of the DU score test on simulated data with spatial random effects."""

from __future__ import annotations

import numpy as np
import pytest

from splisosm.data.simulation import simulate_isoform_data
from splisosm.hyptest_glmm import SplisosmGLMM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def du_pvalues() -> tuple[np.ndarray, np.ndarray]:
    """Score-test p-values (glmm-full) and the truth: 120 genes on a 10 x 10 grid, 30 % DU.

    Every gene has a spatial random effect; the 84 or so genes without a covariate effect are
    the null sample, the others measure power.
    """
    adata = simulate_isoform_data(
        n_genes=120, n_isoforms=3, grid_size=(10, 10), spatial_var=0.5, theta=0.5,
        covariate="continuous", du_fraction=0.3, effect_size=1.0, seed=11,
    )
    model = SplisosmGLMM(fitting_configs={"max_epochs": 300})
    model.setup_data(adata, design_mtx="covariate", group_gene_by_n_iso=True)
    model.fit(batch_size=120, print_progress=False, random_seed=0)
    model.test_differential_usage(print_progress=False)
    truth = np.asarray(adata.uns["simulation"]["genes"]["is_du"], dtype=bool)
    keep = [adata.uns["simulation"]["genes"]["gene_symbol"].index(g) for g in model.gene_names]
    return model.du_results.pvalue[:, 0], truth[keep]


def test_score_test_calibrated_under_null(du_pvalues) -> None:
    pvalues, truth = du_pvalues
    null = pvalues[~truth]
    assert len(null) >= 70
    assert np.mean(null < 0.05) < 0.10
    assert null.min() > 1e-4
    # not degenerate either: null p-values spread over the unit interval
    assert np.quantile(null, 0.9) - np.quantile(null, 0.1) > 0.3


def test_score_test_finds_strong_effects(du_pvalues) -> None:
    pvalues, truth = du_pvalues
    assert truth.sum() >= 25
    assert np.mean(pvalues[truth] < 0.05) > 0.8
    assert pvalues[truth].min() < 1e-8


# ------------------------------------------------------------------ marginal score tests
@pytest.fixture(scope="module")
def du_marginal_pvalues() -> dict[str, np.ndarray]:
    """Conditional and marginal score p-values: 120 genes, 30 % with a small effect on ``c1``,
    and a spatially smooth null covariate ``c2`` (a draw from the kernel)."""
    from splisosm.spatial.kernel import SpatialCovKernel

    adata = simulate_isoform_data(
        n_genes=120, n_isoforms=3, grid_size=(15, 15), spatial_var=0.5, theta=0.5,
        covariate="continuous", du_fraction=0.3, effect_size=0.15, seed=5,
    )
    kernel = SpatialCovKernel(adata.obsm["spatial"], dense_threshold=0)
    adata.obs["c2"] = kernel.sample(1, np.random.default_rng(6))[:, 0]
    model = SplisosmGLMM(fitting_configs={"max_epochs": 300})
    model.setup_data(adata, design_mtx=["covariate", "c2"], group_gene_by_n_iso=True)
    model.fit(batch_size=120, print_progress=False, random_seed=0)
    truth = np.asarray(adata.uns["simulation"]["genes"]["is_du"], dtype=bool)
    keep = [adata.uns["simulation"]["genes"]["gene_symbol"].index(g) for g in model.gene_names]
    out = {"truth": truth[keep]}
    for method in ("score", "marginal-score"):
        res = model.test_differential_usage(method=method, return_results=True, print_progress=False)
        out[method] = res["pvalue"].numpy()
    return out


def test_marginal_score_calibrated_on_null_covariates(du_marginal_pvalues) -> None:
    p, truth = du_marginal_pvalues["marginal-score"], du_marginal_pvalues["truth"]
    null = np.concatenate([p[~truth, 0], p[:, 1]])  # c1 on null genes, c2 (smooth) everywhere
    assert len(null) >= 190
    assert 0.01 <= np.mean(null < 0.05) <= 0.10
    # roughly uniform: each fifth of [0, 1] holds 10-30 % of the null p-values
    hist = np.histogram(null, bins=5, range=(0, 1))[0] / len(null)
    assert hist.min() > 0.10 and hist.max() < 0.30


def test_marginal_score_more_powerful_than_conditional(du_marginal_pvalues) -> None:
    truth = du_marginal_pvalues["truth"]
    marginal = np.mean(du_marginal_pvalues["marginal-score"][truth, 0] < 0.05)
    conditional = np.mean(du_marginal_pvalues["score"][truth, 0] < 0.05)
    assert marginal >= conditional + 0.1
    # the conditional test is the conservative one
    assert np.mean(du_marginal_pvalues["score"][:, 1] < 0.05) < 0.02


@pytest.fixture(scope="module")
def sv_pvalues() -> dict[str, np.ndarray]:
    """SV LLR (chi-bar-square) and score p-values after marginal_newton: 160 genes on a 15 x 15
    grid, half null (white noise only), half with a spatial effect."""
    adata = simulate_isoform_data(
        n_genes=160, n_isoforms=3, grid_size=(15, 15), spatial_var=0.5, theta=0.6,
        sv_fraction=0.5, seed=9,
    )
    model = SplisosmGLMM(fitting_method="marginal_newton")
    model.setup_data(adata, group_gene_by_n_iso=True)
    model.fit(from_null=True, batch_size=160, print_progress=False, random_seed=0)
    truth = np.asarray(adata.uns["simulation"]["genes"]["is_sv"], dtype=bool)
    keep = [adata.uns["simulation"]["genes"]["gene_symbol"].index(g) for g in model.gene_names]
    out = {"truth": truth[keep]}
    for method in ("llr", "score"):
        out[method] = model.test_spatial_variability(method=method, return_results=True,
                                                     print_progress=False)["pvalue"]
    return out


@pytest.mark.parametrize("method", ["llr", "score"])
def test_sv_tests_calibrated_and_powerful(sv_pvalues, method) -> None:
    p, truth = sv_pvalues[method], sv_pvalues["truth"]
    assert (~truth).sum() >= 70
    assert np.mean(p[~truth] < 0.05) <= 0.10
    assert np.mean(p[truth] < 0.05) >= 0.8


def test_sv_score_null_pvalues_spread(sv_pvalues) -> None:
    p = sv_pvalues["score"][~sv_pvalues["truth"]]
    # not degenerate (the joint-fit LLR put every null p-value at 1)
    assert np.mean(p >= 1 - 1e-9) < 0.05
    assert np.quantile(p, 0.75) - np.quantile(p, 0.25) > 0.25
