"""SV and DU tests, formatted results, feature summaries and the text report."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import chi2

from helpers.glmm_data import make_adata
from splisosm.glmm import _fit, _runner
from splisosm.glmm._sv import null_at_mode
from splisosm.glmm.stats import bh_adjust
from splisosm.hyptest_glmm import SplisosmGLMM

EPOCHS = {"max_epochs": 20}


def _model(model_type: str = "glmm-full", design=("cov", "flag"), **kwargs) -> SplisosmGLMM:
    model = SplisosmGLMM(model_type=model_type, fitting_configs=dict(EPOCHS), **kwargs)
    model.setup_data(make_adata(du_effect=[2.0, 0, 0, 0]), group_gene_by_n_iso=True,
                     design_mtx=None if design is None else list(design))
    return model


@pytest.fixture(scope="module")
def sv_model() -> SplisosmGLMM:
    model = _model(fitting_method="marginal_newton")  # the fit whose LLR is informative
    model.fit(from_null=True, batch_size=2, print_progress=False, random_seed=0)
    return model


# ------------------------------------------------------------------------------ DU
def test_du_validation_order() -> None:
    with pytest.raises(ValueError, match="No design"):
        _model(design=None).test_differential_usage()
    model = _model()
    with pytest.raises(ValueError, match="method"):
        model.test_differential_usage(method="lrt")
    with pytest.raises(ValueError, match="with_design_mtx=True"):
        model.test_differential_usage(method="wald")
    with pytest.raises(ValueError, match="No fitted models"):
        model.test_differential_usage(method="score")
    model.fit(with_design_mtx=True, print_progress=False)
    with pytest.raises(ValueError, match="with_design_mtx=False"):
        model.test_differential_usage(method="score")


@pytest.mark.parametrize("model_type", ["glmm-full", "glm"])
@pytest.mark.parametrize("method", ["score", "wald"])
def test_du_results(model_type, method) -> None:
    model = _model(model_type)
    model.fit(with_design_mtx=method == "wald", batch_size=2, print_progress=False)
    assert model.test_differential_usage(method=method, print_progress=False) is None
    res = model.test_differential_usage(method=method, print_progress=False, return_results=True)
    assert set(res) == {"statistic", "pvalue", "method", "pvalue_adj", "converged"} and res["method"] == method
    assert res["statistic"].shape == (4, 2) and res["pvalue"].dtype == torch.float64
    assert isinstance(res["pvalue_adj"], np.ndarray)
    df_q = np.array(model.n_isos_per_gene)[:, None] - 1
    np.testing.assert_allclose(res["pvalue"].numpy(), chi2.sf(res["statistic"].numpy().astype(float), df_q), rtol=1e-5)
    np.testing.assert_allclose(res["pvalue_adj"], bh_adjust(res["pvalue"].numpy()))
    # the strong effect of gene G0 on 'cov' is detected
    assert res["pvalue"][0, 0] < 1e-3
    table = model.get_formatted_test_results("du")
    assert list(table.columns) == ["gene", "covariate", "statistic", "pvalue", "pvalue_adj", "converged"]
    assert list(table["gene"]) == [g for g in model.gene_names for _ in range(2)]
    assert list(table["covariate"][:2]) == ["cov", "flag"]
    assert isinstance(table.index, pd.RangeIndex)


def test_score_statistic_matches_hand_computation() -> None:
    """One gene, one covariate: U^T (I + 1e-5 I)^-1 U at the fitted ratios (Q11 sign)."""
    model = _model("glm", design=("cov",))
    model.fit(print_progress=False)
    res = model.test_differential_usage(print_progress=False, return_results=True)
    g = 1
    pi = model.get_fitted_models()[g].get_isoform_ratio()[0].double()
    Y = model.setup_record.genes.counts[g].double()
    x = model.design_mtx[:, 0].double()
    N = Y.sum(1)
    q = Y.shape[1] - 1
    r = Y[:, :q] - N[:, None] * pi[:, :q]
    U = (x[:, None] * r).sum(0)
    p = pi[:, :q]
    W = N[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    info = (x[:, None, None] ** 2 * W).sum(0) + 1e-5 * torch.eye(q, dtype=torch.float64)
    expected = U @ torch.linalg.solve(info, U)
    assert float(res["statistic"][g, 0]) == pytest.approx(float(expected), rel=1e-4)


def test_covariate_fallback_labels() -> None:
    model = _model("glm", design=("cov",))
    assert model.setup_record.covariate_labels() == ["cov"]
    # files that recorded no covariate names label the columns by position
    unnamed = dataclasses.replace(model.setup_record, covariate_names=None)
    assert unnamed.covariate_labels() == ["factor_0"]
    model.fit(print_progress=False)
    model.test_differential_usage(print_progress=False)
    assert model.du_results.covariates == ["cov"]


# ------------------------------------------------------------------------------ SV
def test_sv_validation() -> None:
    model = _model("glmm-null", design=None)
    with pytest.raises(ValueError, match="from_null=True"):
        model.test_spatial_variability()
    model.fit(print_progress=False)
    with pytest.raises(ValueError, match="from_null=True"):  # Q9: clear error, no IndexError
        model.test_spatial_variability()
    with pytest.raises(ValueError, match="llr"):
        model.test_spatial_variability(method="wald")


def test_sv_chibar2(sv_model) -> None:
    res = sv_model.test_spatial_variability(return_results=True, print_progress=False)
    assert set(res) == {"statistic", "pvalue", "df", "method", "use_perm_null", "pvalue_adj", "converged"}
    assert (res["statistic"] >= 0).all()  # Q22: negative LLRs are reported as 0
    assert (res["df"] == 1).all()
    stat = res["statistic"].astype(float)
    # boundary-aware reference: half the chi2(1) tail, and p = 1 at T = 0
    expected = np.where(stat > 0, 0.5 * chi2.sf(stat, 1), 1.0)
    np.testing.assert_allclose(res["pvalue"], expected, rtol=1e-6)
    table = sv_model.get_formatted_test_results("sv")
    assert list(table.columns) == ["gene", "statistic", "pvalue", "pvalue_adj", "converged"]
    assert list(table["gene"]) == sv_model.gene_names


def test_sv_statistic_is_marginal_llr(sv_model) -> None:
    res = sv_model.test_spatial_variability(return_results=True, print_progress=False)
    g = 1
    full = _fit.Fitted(sv_model.config, sv_model.setup_record, sv_model.fit_record).rebuild("glmm-full", [g])
    null = _fit.Fitted(sv_model.config, sv_model.setup_record, sv_model.fit_record).rebuild("glmm-null", [g])
    with torch.no_grad():
        as_fitted = null.marginal_loglik().item()
        null_at_mode(null)  # the null model is taken at the mode of its likelihood
        at_mode = null.marginal_loglik().item()
        expected = 2 * (full.marginal_loglik().item() - at_mode)
    assert at_mode >= as_fitted - 1e-6
    assert res["statistic"][g] == pytest.approx(max(expected, 0.0), rel=1e-4, abs=1e-4)


def test_sv_unshared_variance_df() -> None:
    model = _model(design=None, share_variance=False)
    model.fit(from_null=True, print_progress=False)
    res = model.test_spatial_variability(return_results=True, print_progress=False)
    assert list(res["df"]) == [1, 2, 1, 2]


def test_sv_permutation_null(sv_model, monkeypatch) -> None:
    with pytest.raises(ValueError, match="n_perms_per_gene"):
        sv_model.test_spatial_variability(use_perm_null=True, n_perms_per_gene=0)
    with pytest.raises(ValueError, match="Unknown"):
        sv_model.test_spatial_variability(use_perm_null=True, n_workers=2)
    calls = []
    original = _runner.run_batches

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(_runner, "run_batches", counting)
    res = sv_model.test_spatial_variability(
        use_perm_null=True, n_perms_per_gene=3, random_seed=5, print_progress=False, return_results=True
    )
    assert len(calls) == 3 and res["use_perm_null"]
    stats = sv_model.permutation_cache.stats
    assert stats.shape == (3, 4)
    assert not np.allclose(stats[0], stats[1])  # Q6: independent permutations
    expected = (1 + (stats >= res["statistic"][None, :]).sum(0)) / 4
    np.testing.assert_allclose(res["pvalue"], expected)
    assert res["pvalue"].dtype == np.float64  # one p-value type, whatever the null
    # cached for the same fit and number of permutations ...
    again = sv_model.test_spatial_variability(
        use_perm_null=True, n_perms_per_gene=3, random_seed=5, print_progress=False, return_results=True
    )
    assert len(calls) == 3
    np.testing.assert_array_equal(again["pvalue"], res["pvalue"])
    # ... recomputed for a different number (Q7)
    sv_model.test_spatial_variability(use_perm_null=True, n_perms_per_gene=2, random_seed=5, print_progress=False)
    assert len(calls) == 5 and sv_model.permutation_cache.stats.shape == (2, 4)


def test_permutations_seeded_and_dropped_on_refit() -> None:
    model = _model(design=None)
    model.fit(from_null=True, batch_size=2, print_progress=False)
    kwargs = dict(use_perm_null=True, n_perms_per_gene=2, random_seed=3, print_progress=False)
    model.test_spatial_variability(**kwargs)
    first = model.permutation_cache.stats.copy()
    model.fit(from_null=True, batch_size=2, print_progress=False)
    assert model.permutation_cache is None and model.sv_results is None and model._sv_test_results == {}
    model.test_spatial_variability(**kwargs)
    np.testing.assert_allclose(model.permutation_cache.stats, first, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ results
def test_formatted_results_errors(sv_model) -> None:
    with pytest.raises(ValueError, match="test_type"):
        sv_model.get_formatted_test_results("hsic")
    fresh = _model()
    with pytest.raises(ValueError, match="test_differential_usage"):
        fresh.get_formatted_test_results("du")
    with pytest.raises(ValueError, match="test_spatial_variability"):
        fresh.get_formatted_test_results("sv")


def test_results_with_gene_summary(sv_model) -> None:
    sv_model.test_spatial_variability(print_progress=False)
    sv_model.test_differential_usage(print_progress=False)
    summary_cols = ["n_isos", "perplexity", "pct_bin_on", "count_avg", "count_std", "major_ratio_avg"]
    sv = sv_model.get_formatted_test_results("sv", with_gene_summary=True)
    assert list(sv.columns) == ["gene", "statistic", "pvalue", "pvalue_adj", "converged"] + summary_cols
    du = sv_model.get_formatted_test_results("du", with_gene_summary=True)
    assert len(du) == 8 and list(du["n_isos"]) == [n for n in sv_model.n_isos_per_gene for _ in range(2)]


# ------------------------------------------------------------------------------ summaries
def test_feature_summary_values() -> None:
    model = _model("glm", design=None)
    with pytest.raises(ValueError, match="level"):
        model.extract_feature_summary("transcript")
    with pytest.raises(RuntimeError):
        SplisosmGLMM().extract_feature_summary()
    genes = model.extract_feature_summary("gene", print_progress=False)
    assert genes is model.extract_feature_summary("gene")  # cached
    assert list(genes.columns) == ["n_isos", "perplexity", "pct_bin_on", "count_avg", "count_std", "major_ratio_avg"]
    assert list(genes.index) == model.gene_names and genes.index.name == "gene"
    Y = model.setup_record.genes.counts[1].double().numpy()
    N = Y.sum(1)
    R = Y.sum(0) / Y.sum()
    row = genes.iloc[1]
    assert row["n_isos"] == 3
    assert row["perplexity"] == pytest.approx(np.exp(-(R * np.log(R)).sum()))
    assert row["pct_bin_on"] == pytest.approx((N > 0).mean())
    assert row["count_avg"] == pytest.approx(N.mean())
    assert row["count_std"] == pytest.approx(N.std())
    assert row["major_ratio_avg"] == pytest.approx(R.max())
    isos = model.extract_feature_summary("isoform", print_progress=False)
    assert list(isos.index) == list(model.filtered_adata.var_names)
    assert list(isos.columns) == ["gene_symbol", "gene_label", "pct_bin_on", "count_total", "count_avg",
                                  "count_std", "ratio_total", "ratio_avg", "ratio_std"]
    on = N > 0
    iso = isos.loc["G1_T2"]
    assert iso["count_total"] == pytest.approx(Y[:, 2].sum())
    assert iso["ratio_total"] == pytest.approx(R[2])
    assert iso["ratio_avg"] == pytest.approx((Y[on, 2] / N[on]).mean())
    assert iso["ratio_std"] == pytest.approx((Y[on, 2] / N[on]).std())


def test_report_sections() -> None:
    model = SplisosmGLMM()
    text = str(model)
    assert "genes: None" in text and "Fitting: not trained" in text and "SV test: NA" in text
    model = _model()
    model.fit(print_progress=False)
    model.test_differential_usage(print_progress=False)
    text = repr(model)
    assert "genes: 4" in text and "spots: 64" in text and "covariates: 2" in text
    assert "k_neighbors: 4" in text and "rho: 0.99" in text
    assert "/4 converged" in text and "DU test: Completed (score)" in text and "SV test: NA" in text
