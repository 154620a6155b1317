"""Results written into an AnnData survive write_h5ad / read_h5ad."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from splisosm.data.simulation import simulate_isoform_data
from splisosm.hyptest_glmm import SplisosmGLMM


@pytest.fixture(scope="module")
def analysed():
    adata = simulate_isoform_data(n_genes=6, n_isoforms=[2, 3, 4, 2, 3, 4], grid_size=(8, 8),
                                  du_fraction=0.5, seed=3)
    # one isoform the count filter drops, so the analysis covers fewer isoforms than the data
    adata.layers["counts"] = adata.layers["counts"].copy()
    adata.layers["counts"][:, 2] = 0  # the first of gene 1's three isoforms
    model = SplisosmGLMM(fitting_method="marginal_newton")
    model.setup_data(adata, group_gene_by_n_iso=True, design_mtx="covariate")
    model.fit(batch_size=6, from_null=True, print_progress=False)
    model.test_differential_usage(method="marginal-score", print_progress=False)
    model.test_spatial_variability(method="score", print_progress=False)
    return adata, model


def test_round_trip_into_the_users_anndata(analysed, tmp_path) -> None:
    adata, model = analysed
    out = model.write_results(adata)
    assert out is adata
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    stored = back.uns["splisosm"]
    for test in ("du", "sv"):
        expected = model.get_formatted_test_results(test)
        got = stored[f"{test}_results"]
        pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=False)
    summary = model.get_training_summary().reset_index()
    pd.testing.assert_frame_equal(stored["training_summary"].reset_index(drop=True), summary,
                                  check_dtype=False)
    assert json.loads(stored["config"])["fitting_method"] == "marginal_newton"
    # fitted ratios at the analysed isoforms, NaN at the dropped one
    layer = back.layers["splisosm_fitted_ratios"]
    fitted = model.get_fitted_ratios_anndata()
    cols = back.var_names.get_indexer(fitted.var_names)
    np.testing.assert_allclose(layer[:, cols], fitted.layers["fitted_ratios"], rtol=1e-6)
    dropped = np.setdiff1d(np.arange(back.n_vars), cols)
    assert dropped.size == 1 and np.isnan(layer[:, dropped]).all()
    genes = back.var["splisosm_gene"]
    assert genes.iloc[dropped[0]] == ""
    assert list(genes.iloc[cols]) == [model.gene_names[g] for g, idx in enumerate(model.setup_record.genes.var_index)
                                      for _ in idx]
    # each gene's ratios sum to one over its isoforms
    for idx in model.setup_record.genes.var_index:
        np.testing.assert_allclose(fitted.layers["fitted_ratios"][:, idx].sum(1), 1.0, rtol=1e-5)


def test_default_target_is_a_copy_of_the_filtered_data(analysed) -> None:
    _, model = analysed
    out = model.write_results(key_added="run1")
    assert out is not model.filtered_adata and out.shape == model.filtered_adata.shape
    assert "run1" in out.uns and "run1_fitted_ratios" in out.layers
    assert "run1" not in model.filtered_adata.uns


def test_before_a_fit_only_the_setup_is_written() -> None:
    adata = simulate_isoform_data(n_genes=2, n_isoforms=3, grid_size=(6, 6), seed=0)
    model = SplisosmGLMM()
    with pytest.raises(RuntimeError, match="setup_data"):
        model.write_results(adata)
    model.setup_data(adata)
    model.write_results(adata)
    assert set(adata.uns["splisosm"]) == {"config", "version"}
    assert "splisosm_fitted_ratios" not in adata.layers


def test_an_anndata_without_the_analysed_spots_is_refused(analysed) -> None:
    adata, model = analysed
    with pytest.raises(ValueError, match="lacks .* spot"):
        model.write_results(adata[:10].copy())
    renamed = adata.copy()
    renamed.var_names = [f"x{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="lacks .* isoform"):
        model.write_results(renamed)
