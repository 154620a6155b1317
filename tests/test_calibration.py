"""Calibration and power of the DU score test on simulated data with spatial random effects."""

from __future__ import annotations

import numpy as np
import pytest

from splisosm.hyptest_glmm import SplisosmGLMM
from splisosm.simulation import simulate_isoform_data


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
    return model._du_test_results["pvalue"].numpy()[:, 0], truth[keep]


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
