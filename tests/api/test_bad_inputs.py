"""Bad settings and degenerate data: each ends in an error naming the culprit, or a warning and a
documented result, never in a confident p-value from a fit that did not happen.

(Damaged save files and the command line's input checks are in ``test_bad_load.py``.)
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from helpers.glmm_data import make_adata
from splisosm.glmm import _fit
from splisosm.glmm._fitting import NOT_CONVERGED
from splisosm.hyptest_glmm import SplisosmGLMM

FEW = {"max_epochs": 30}


def _messages(record) -> list[str]:
    return [str(w.message) for w in record]


# ------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"fitting_configs": {"max_epochs": 0}}, "fitting_configs['max_epochs']` must be an int >= 1"),
        ({"fitting_configs": {"max_epochs": -5}}, "fitting_configs['max_epochs']` must be an int >= 1"),
        ({"fitting_configs": {"max_epochs": "ten"}}, "fitting_configs['max_epochs']` must be an int"),
        ({"fitting_configs": {"max_epochs": 10.5}}, "fitting_configs['max_epochs']` must be an int"),
        ({"fitting_configs": {"tol": float("nan")}}, "fitting_configs['tol']` must be a finite number"),
        ({"fitting_configs": {"tol": -1e-3}}, "fitting_configs['tol']` must be a finite number"),
        ({"fitting_configs": {"lr": "fast"}}, "fitting_configs['lr']` must be a number"),
        ({"fitting_configs": {"lr": -1}}, "fitting_configs['lr']` must be a finite number in (0, inf)"),
        ({"fitting_configs": {"lr": 0}}, "fitting_configs['lr']` must be a finite number in (0, inf)"),
        ({"fitting_configs": {"patience": "5"}}, "fitting_configs['patience']` must be an int"),
        ({"fitting_configs": {"tol_relative": 1}}, "fitting_configs['tol_relative']` must be True or False"),
        ({"fitting_configs": {"optim": "rmsprop"}}, "optim 'rmsprop'"),
        ({"fitting_configs": {"max_epoch": 3}}, "unknown key 'max_epoch' (did you mean 'max_epochs'?)"),
        ({"fitting_configs": {"batch_size": 3}}, "'batch_size' is an argument of SplisosmGLMM.fit()"),
        ({"fitting_configs": [("lr", 0.1)]}, "`fitting_configs` must be a dict or None"),
        ({"var_prior_model_params": {"shape": 3}}, "`var_prior_model_params` has an unknown key 'shape'"),
        ({"var_prior_model": "gamma", "var_prior_model_params": {"shape": 3}}, "unknown key 'shape'"),
        ({"var_prior_model": "gamma", "var_prior_model_params": {"alpha": -2.0}},
         "var_prior_model_params['alpha']` must be a finite number in (0, inf)"),
        ({"var_prior_model": "inv_gamma", "var_prior_model_params": {"beta": 0}},
         "var_prior_model_params['beta']` must be a finite number in (0, inf)"),
        ({"rho": "high"}, "`rho` must be a number"),
        ({"rho": 1.0}, "`rho` must be a finite number in [0, 1)"),
        ({"k_neighbors": 2.5}, "`k_neighbors` must be an int"),
        ({"share_variance": "yes"}, "`share_variance` must be True or False"),
        ({"var_fix_sigma": None}, "`var_fix_sigma` must be True or False"),
        ({"device": "gpu"}, "Invalid device 'gpu'"),
    ],
)
def test_bad_settings_name_the_argument(kwargs, culprit) -> None:
    with pytest.raises(ValueError) as info:
        SplisosmGLMM(**kwargs)
    assert culprit in str(info.value)


def test_prior_parameters_without_a_prior_warn() -> None:
    with pytest.warns(UserWarning, match="ignored with var_prior_model='none'"):
        model = SplisosmGLMM(var_prior_model_params={"alpha": 3.0})
    assert model.model_configs["var_prior_model_params"] == {}


@pytest.mark.parametrize(
    ("method", "configs", "unused"),
    [
        ("marginal_newton", {"lr": 0.1, "update_nu_every_k": 3, "max_epochs": 5}, ["lr", "update_nu_every_k"]),
        ("joint_newton", {"optim": "sgd", "patience": 3}, ["optim"]),
        ("joint_gd", {"update_nu_every_k": 2, "lr": 0.1}, ["update_nu_every_k"]),
    ],
)
def test_fitting_configs_without_effect_warn_once(method, configs, unused, tmp_path) -> None:
    extra = {"var_fix_sigma": False} if method == "joint_newton" else {}
    with pytest.warns(UserWarning, match="without effect") as record:
        model = SplisosmGLMM(fitting_method=method, fitting_configs=dict(configs), **extra)
    said = [m for m in _messages(record) if "without effect" in m]
    assert len(said) == 1
    assert said[0].startswith(f"fitting_configs key(s) without effect with fitting_method={method!r}: {unused};")
    assert record[0].filename == __file__
    # the per-gene models the fit builds from the same settings stay quiet
    model.setup_data(make_adata(side=4), group_gene_by_n_iso=True)
    with warnings.catch_warnings(record=True) as during:
        warnings.simplefilter("always")
        model.fit(from_null=method != "joint_newton", print_progress=False)
        model.save(tmp_path / "model")
        loaded = SplisosmGLMM.load(tmp_path / "model")
    assert not [m for m in _messages(during) if "without effect" in m]
    assert loaded.model_configs == model.model_configs


def test_per_gene_models_warn_about_configs_without_effect() -> None:
    from splisosm.glmm.isomodels import IsoFullModel, IsoNullNoSpVar

    with pytest.warns(UserWarning, match=r"without effect with fitting_method='marginal_newton': \['lr'\]") as record:
        null = IsoNullNoSpVar(fitting_method="marginal_newton", fitting_configs={"lr": 0.5})
    assert record[0].filename == __file__
    counts = torch.ones(1, 9, 2)
    null.setup_data(counts, corr_sp=torch.eye(9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IsoFullModel(fitting_method="marginal_gd", fitting_configs={"lr": 0.5, "optim": "sgd"})
        IsoFullModel.from_trained_null(null)  # same settings, already announced
        null.clone()


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_unavailable_device(device, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"device='{device}' is not available"):
        SplisosmGLMM(device=device)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"min_counts": "10"}, "`min_counts` must be a number"),
        ({"min_counts": -1}, "`min_counts` must be a finite number in [0, inf)"),
        ({"min_bin_pct": float("nan")}, "`min_bin_pct` must be a finite number in [0, 100]"),
        ({"min_bin_pct": 150}, "`min_bin_pct` must be a finite number in [0, 100]"),
    ],
)
def test_bad_filters_name_the_argument(kwargs, culprit) -> None:
    with pytest.raises(ValueError) as info:
        SplisosmGLMM().setup_data(make_adata(side=5), **kwargs)
    assert culprit in str(info.value)


# ------------------------------------------------------------------------ degenerate data
@pytest.mark.parametrize("n_spots", [1, 2, 9])
def test_too_few_spots(n_spots) -> None:
    adata = make_adata(side=5)[:n_spots].copy()
    with pytest.raises(ValueError, match=f"`adata` has {n_spots} spot\\(s\\); splisosm needs at least 10"):
        SplisosmGLMM().setup_data(adata)


def test_component_filter_leaving_too_few_spots() -> None:
    adata = make_adata(side=5)
    chain = sp.diags([np.ones(8)], [1], shape=(9, 9))  # spots 0-8 connected, the rest isolated
    adata.obsp["graph"] = sp.block_diag([chain + chain.T, sp.csr_matrix((16, 16))], format="csr")
    with pytest.raises(ValueError, match=r"After `min_component_size`=2, the data has 9 spot\(s\)"):
        SplisosmGLMM().setup_data(adata, adj_key="graph", min_component_size=2)


def test_all_gene_labels_missing() -> None:
    adata = make_adata(side=5)
    adata.var["gene_symbol"] = np.nan
    with pytest.raises(ValueError, match=r"Every value of adata.var\['gene_symbol'\] \(`group_iso_by`\) is missing"):
        SplisosmGLMM().setup_data(adata)


def test_unlabelled_isoforms_are_reported() -> None:
    adata = make_adata(side=5, n_isos=(2, 3))
    symbols = adata.var["gene_symbol"].astype(object).to_numpy()
    symbols[-1] = np.nan
    adata.var["gene_symbol"] = symbols
    model = SplisosmGLMM()
    with pytest.warns(UserWarning, match=r"1 isoforms have no gene label \(NaN in adata.var\['gene_symbol'\]\)"):
        model.setup_data(adata)
    assert model.n_isos_per_gene == [2, 2]


def test_all_zero_gene_is_reported() -> None:
    adata = make_adata(side=5, n_isos=(2, 3, 2))
    counts = np.array(adata.layers["counts"])
    counts[:, adata.var["gene_symbol"].to_numpy() == "G1"] = 0
    adata.layers["counts"] = counts
    model = SplisosmGLMM()
    with pytest.warns(UserWarning, match="1 genes were dropped because none of their isoforms passed"):
        model.setup_data(adata)
    assert model.gene_names == ["G0", "G2"]


def test_categorical_nan_covariate_is_refused() -> None:
    adata = make_adata(side=5)
    region = adata.obs["region"].astype(object).to_numpy()
    region[:3] = np.nan
    adata.obs["region"] = pd.Categorical(region)
    with pytest.raises(ValueError, match="obs column 'region' used in `design_mtx` has 3 missing"):
        SplisosmGLMM().setup_data(adata, design_mtx="region")


def test_stored_zeros_are_not_expression() -> None:
    dense = make_adata(side=5, n_isos=(2, 3, 2), depth=3.0, seed=4)
    counts = np.array(dense.layers["counts"])
    # A CSR matrix that stores every zero explicitly (as some converters write them).
    rows, cols = np.nonzero(np.ones_like(counts))
    stored = sp.csr_matrix((counts[rows, cols], (rows, cols)), shape=counts.shape)
    assert stored.nnz == counts.size
    sparse = dense.copy()
    sparse.layers["counts"] = stored
    kept = []
    for adata in (dense, sparse):
        model = SplisosmGLMM()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model.setup_data(adata, min_counts=0, min_bin_pct=0.5)
        kept.append(list(model.filtered_adata.var_names))
    assert kept[0] == kept[1]
    assert len(kept[0]) < counts.shape[1]  # the threshold removed something, so it was tested


def test_adjacency_without_edges_is_refused() -> None:
    adata = make_adata(side=5)
    adata.obsp["isolated"] = sp.identity(adata.n_obs, format="csr")  # self-loops only
    with pytest.raises(ValueError, match=r"adata.obsp\['isolated'\] \(`adj_key`\) has no edge"):
        SplisosmGLMM().setup_data(adata, adj_key="isolated")


# ------------------------------------------------------------------------ fits that did not happen
def _fitted(quiet: bool = True, epochs: int = 10, **kwargs) -> tuple[SplisosmGLMM, list[str]]:
    model = SplisosmGLMM(fitting_configs={"max_epochs": epochs}, **kwargs)
    model.setup_data(make_adata(side=5, du_effect=(1.0, 0.0, 0.0, 0.0)), design_mtx="cov",
                     group_gene_by_n_iso=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(quiet=quiet, print_progress=False, batch_size=2)
    return model, _messages(record)


@pytest.mark.parametrize("quiet", [True, False])
def test_one_non_convergence_warning_whatever_quiet_says(quiet, capsys) -> None:
    model, messages = _fitted(quiet=quiet)
    summary = [m for m in messages if "did not converge" in m]
    assert len(summary) == 1, messages
    assert re.search(r"4 of 4 glmm-full fits did not converge .*max_epochs=10", summary[0])
    assert not any(m.endswith(f"{NOT_CONVERGED}.") for m in messages)  # per-batch ones silenced
    model.test_differential_usage(print_progress=False)
    table = model.get_formatted_test_results("du")
    assert "converged" in table.columns and not table["converged"].any()


@pytest.mark.parametrize("relative", [False, True])
def test_non_convergence_warning_suggests_what_is_not_set_yet(relative) -> None:
    configs = {"max_epochs": 10, "tol_relative": relative}
    model = SplisosmGLMM(fitting_configs=configs)
    model.setup_data(make_adata(side=5), group_gene_by_n_iso=True)
    with pytest.warns(UserWarning, match="did not converge") as record:
        model.fit(print_progress=False, batch_size=2)
    summary = next(str(w.message) for w in record if "did not converge" in str(w.message))
    assert ("'tol_relative': True" in summary) is not relative
    assert ("marginal_newton" in summary) is relative


def test_converged_fits_are_flagged_true() -> None:
    model, messages = _fitted(epochs=500, fitting_method="marginal_newton")
    assert not any("did not converge" in m for m in messages)
    model.test_differential_usage(method="marginal-score", print_progress=False)
    assert model.get_formatted_test_results("du")["converged"].all()
    assert model.get_training_summary()["converged"].all()


def test_sv_tables_flag_the_fits_they_read() -> None:
    model = SplisosmGLMM(fitting_configs={"max_epochs": 10})
    model.setup_data(make_adata(side=5), group_gene_by_n_iso=True)
    with pytest.warns(UserWarning, match="4 of 4 glmm-null fits, 4 of 4 glmm-full fits did not converge"):
        model.fit(from_null=True, print_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the joint-fit LLR warning
        model.test_spatial_variability(method="llr", print_progress=False)
    assert not model.get_formatted_test_results("sv")["converged"].any()


def test_genes_never_fitted_get_nan(monkeypatch) -> None:
    model, _ = _fitted()
    state = model.fit_record.states["glmm-full"][2]
    monkeypatch.setattr(state, "best_epoch", -1)  # as after an objective that was never finite
    with pytest.warns(UserWarning, match=r"1 gene\(s\) never reached a finite loss .*'G2'"):
        model.test_differential_usage(print_progress=False)
    table = model.get_formatted_test_results("du").set_index("gene")
    assert np.isnan(table.loc["G2", "pvalue"]) and np.isnan(table.loc["G2", "statistic"])
    assert np.isfinite(table.drop(index="G2")["pvalue"]).all()


def test_tests_refuse_an_unfitted_model() -> None:
    model = SplisosmGLMM()
    model.setup_data(make_adata(side=5), design_mtx="cov")
    with pytest.raises(ValueError, match=r"call fit\(\) first"):
        model.test_differential_usage(print_progress=False)
    with pytest.raises(ValueError, match=r"call fit\(from_null=True\) first"):
        model.test_spatial_variability(print_progress=False)


def test_wald_with_a_covariate_of_large_magnitude() -> None:
    adata = make_adata(side=6, du_effect=(1.5, 0.0, 0.0, 0.0))
    stats = {}
    for name, values in (("plain", adata.obs["cov"].to_numpy()),
                         ("huge", 1e10 * adata.obs["cov"].to_numpy() + 1e9)):
        adata.obs[name] = values
        model = SplisosmGLMM(fitting_configs={"max_epochs": 100})
        model.setup_data(adata, design_mtx=name, group_gene_by_n_iso=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model.fit(with_design_mtx=True, print_progress=False)
        stats[name] = model.test_differential_usage("wald", return_results=True,
                                                    print_progress=False)["statistic"][:, 0]
        if name == "huge":
            # Effects come back on the user's scale: the same linear predictor from the raw design.
            user = model.get_gene_model("G0")
            assert torch.equal(user.X.cpu(), model.design_mtx.cpu())
            internal = _fit.Fitted(model.config, model.setup_record, model.fit_record).rebuild("glmm-full", [0])
            torch.testing.assert_close(user._fixed_eta(), internal._fixed_eta(), rtol=1e-4, atol=1e-3)
    huge = stats["huge"]
    assert torch.isfinite(huge).all() and (huge > 0).all()
    assert int(huge.argmax()) == 0 and huge[0] > 10 * huge[1:].max()  # the DU gene stands out


def test_observed_start_keeps_du_power() -> None:
    # Starting the random effect at each spot's own log-ratios (zero counts at +-11.5) left
    # 500-epoch fits mirroring the data and the score test without power.
    pvalues = {}
    for start in ("uniform", "observed"):
        model = SplisosmGLMM(init_ratio=start, fitting_configs={"max_epochs": 200})
        model.setup_data(make_adata(side=6, du_effect=(1.5, 0.0, 0.0, 0.0), depth=10.0),
                         design_mtx="cov", group_gene_by_n_iso=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model.fit(print_progress=False, batch_size=4)
        model.test_differential_usage(print_progress=False)
        pvalues[start] = model.get_formatted_test_results("du")["pvalue"].to_numpy()
    assert pvalues["uniform"][0] < 1e-3 and pvalues["observed"][0] < 1e-3
    np.testing.assert_allclose(np.log10(pvalues["observed"]), np.log10(pvalues["uniform"]), atol=0.5)


def test_chain_overrides_of_user_settings_are_announced() -> None:
    model = SplisosmGLMM(fitting_configs={"max_epochs": 10, "optim": "lbfgs", "lr": 0.5})
    model.setup_data(make_adata(side=5), group_gene_by_n_iso=True)
    with pytest.warns(UserWarning, match=r"fitting_configs \{'lr': 0.5, 'optim': 'lbfgs'\} apply to the first"):
        model.fit(from_null=True, print_progress=False)


def test_fit_with_design_but_no_covariates_runs() -> None:
    # Nothing to rescale: the fit runs as without the design, and the DU tests say what is missing.
    model = SplisosmGLMM(fitting_configs={"max_epochs": 5})
    model.setup_data(make_adata(side=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.fit(with_design_mtx=True, print_progress=False)
    assert model.fit_record.info()["design_scale"] is None
    with pytest.raises(ValueError, match="No design matrix"):
        model.test_differential_usage("wald", print_progress=False)
