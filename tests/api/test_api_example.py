"""The example of the API page, end to end, on a small simulated dataset."""

from __future__ import annotations

import warnings

import pandas as pd

from splisosm import SplisosmGLMM
from splisosm.data.simulation import simulate_isoform_data
from splisosm.hyptest_glmm import IsoFullModel


def test_api_page_example(tmp_path) -> None:
    adata = simulate_isoform_data(
        n_genes=12, n_isoforms=[2, 3, 4] * 4, grid_size=(8, 8), du_fraction=0.25, effect_size=2.0,
        mean_depth=20.0, seed=2,
    )
    model = SplisosmGLMM(
        model_type="glmm-full",
        fitting_method="joint_gd",
        device="cpu",
        fitting_configs={"max_epochs": 100},
    )
    model.setup_data(
        adata,
        layer="counts",
        group_iso_by="gene_symbol",
        group_gene_by_n_iso=True,
        design_mtx="covariate",
    )
    model.fit(n_jobs=1, batch_size=20, with_design_mtx=False, print_progress=False)
    fitted_models = model.get_fitted_models()
    assert len(fitted_models) == model.n_genes == 12
    assert all(isinstance(m, IsoFullModel) for m in fitted_models)

    model.test_differential_usage(method="score", print_progress=False)
    du_results = model.get_formatted_test_results("du")
    assert list(du_results.columns) == ["gene", "covariate", "statistic", "pvalue", "pvalue_adj", "converged"]
    truth = adata.uns["simulation"]["genes"]
    du_genes = {g for g, flag in zip(truth["gene_symbol"], truth["is_du"]) if flag}
    top = set(du_results.nsmallest(len(du_genes), "pvalue")["gene"])
    assert len(top & du_genes) >= len(du_genes) - 1

    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        # save() drops unwritable uns entries with a UserWarning: the truth must not be one
        warnings.simplefilter("error", UserWarning)
        model.save(path)
    loaded = SplisosmGLMM.load(path)
    pd.testing.assert_frame_equal(loaded.get_training_summary(), model.get_training_summary())
    saved, kept = loaded.filtered_adata, model.filtered_adata
    pd.testing.assert_frame_equal(saved.var.filter(like="true_"), kept.var.filter(like="true_"))
    assert saved.uns["simulation"]["genes"]["is_du"].tolist() == truth["is_du"]
