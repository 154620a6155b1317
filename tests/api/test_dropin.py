"""Scripts written for splisosm 1.2.0 run unchanged: its public names, signatures and messages.

Expected names and defaults below are those of the 1.2.0 API documentation; each test fails if
ours drifts from them.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import numpy as np
import pytest
import torch

from helpers.glmm_data import grid_coords, make_adata
from helpers.reference_models import car_kernel, simulate_counts
from splisosm.hyptest_glmm import _APPROX_RANK_AUTO, IsoFullModel, IsoNullNoSpVar, SplisosmGLMM
from splisosm.kernel import IdentityKernel, SpatialCovKernel
from splisosm.model import MultinomGLM, MultinomGLMM
from splisosm.spatial.graph import mutual_knn_adjacency

REQUIRED = inspect.Parameter.empty
FAST = {"max_epochs": 5}
GLMM_TITLE = "A Multinomial Generalized Linear Mixed Model (GLMM)"
GLM_TITLE = "A Multinomial Generalized Linear Model (GLM)"


# ------------------------------------------------------------------------------ import paths
@pytest.mark.parametrize(
    ("module", "names"),
    [
        ("splisosm", ["SplisosmGLMM"]),
        ("splisosm.hyptest_glmm", ["SplisosmGLMM", "IsoFullModel", "IsoNullNoSpVar", "_APPROX_RANK_AUTO"]),
        ("splisosm.model", ["MultinomGLM", "MultinomGLMM"]),
        ("splisosm.kernel", ["SpatialCovKernel", "IdentityKernel"]),
        # the package layout of 1.2.0 itself
        ("splisosm.hyptest.glmm", ["SplisosmGLMM", "IsoFullModel", "IsoNullNoSpVar"]),
        ("splisosm.glmm", ["MultinomGLM", "MultinomGLMM"]),
    ],
)
def test_import_paths(module: str, names: list[str]) -> None:
    mod = importlib.import_module(module)
    for name in names:
        assert hasattr(mod, name), f"{module}.{name}"


def test_every_spelling_is_the_same_class() -> None:
    import splisosm.glmm
    import splisosm.hyptest.glmm

    assert splisosm.SplisosmGLMM is SplisosmGLMM is splisosm.hyptest.glmm.SplisosmGLMM
    assert splisosm.hyptest.glmm.IsoFullModel is IsoFullModel
    assert splisosm.glmm.MultinomGLMM is MultinomGLMM and splisosm.glmm.MultinomGLM is MultinomGLM
    assert issubclass(IsoFullModel, MultinomGLMM) and issubclass(IsoNullNoSpVar, MultinomGLMM)


# ------------------------------------------------------------------------------ signatures
def _assert_signature(func, expected: list[tuple[str, object]], kw_only_from: str | None = None) -> None:
    """``expected`` (name, default) pairs are the leading parameters, in order, with those
    defaults; any further parameters of ours are optional so 1.2.0 calls still bind."""
    params = [p for p in inspect.signature(func).parameters.values() if p.name != "self"]
    got = [(p.name, p.default) for p in params[: len(expected)]]
    assert [n for n, _ in got] == [n for n, _ in expected]
    for (name, default), (_, ours) in zip(expected, got):
        assert ours is default or ours == default, f"{name}: {ours!r} != {default!r}"
    for p in params[len(expected):]:
        assert p.default is not REQUIRED or p.kind is p.VAR_KEYWORD, f"extra required {p.name}"
    if kw_only_from is not None:
        names = [p.name for p in params]
        for p in params[names.index(kw_only_from):len(expected)]:
            assert p.kind is p.KEYWORD_ONLY, p.name


WRAPPER_SIGNATURES = {
    "__init__": [
        ("model_type", "glmm-full"), ("share_variance", True), ("var_fix_sigma", True),
        ("var_prior_model", "none"), ("var_prior_model_params", None), ("init_ratio", "uniform"),
        ("fitting_method", "joint_gd"), ("fitting_configs", None), ("k_neighbors", 4),
        ("rho", 0.99), ("approx_rank", _APPROX_RANK_AUTO), ("device", "cpu"),
    ],
    "setup_data": [
        ("adata", REQUIRED), ("spatial_key", "spatial"), ("adj_key", None), ("layer", "counts"),
        ("group_iso_by", "gene_symbol"), ("gene_names", None), ("group_gene_by_n_iso", False),
        ("design_mtx", None), ("covariate_names", None), ("min_counts", 10),
        ("min_bin_pct", 0.0), ("min_component_size", 1),
    ],
    "fit": [
        ("n_jobs", 1), ("batch_size", 1), ("quiet", True), ("print_progress", True),
        ("with_design_mtx", False), ("from_null", False), ("refit_null", True), ("random_seed", None),
    ],
    "test_spatial_variability": [
        ("method", "llr"), ("use_perm_null", False), ("return_results", False),
        ("print_progress", True), ("n_perms_per_gene", None), ("kwargs", REQUIRED),
    ],
    "test_differential_usage": [("method", "score"), ("print_progress", True), ("return_results", False)],
    "get_formatted_test_results": [("test_type", REQUIRED), ("with_gene_summary", False)],
    "extract_feature_summary": [("level", "gene"), ("print_progress", True)],
    "get_fitted_ratios_anndata": [("layer_name", "fitted_ratios")],
    "get_gene_model": [("gene_name", REQUIRED)],
    "get_fitted_models": [],
    "get_training_summary": [],
    "save": [("path", REQUIRED)],
    "load": [("path", REQUIRED), ("map_location", None)],
}


#: Arguments this package adds after 1.2.0's (scripts written for 1.2.0 never pass them).
EXTRA_ARGUMENTS = {"fit": ["backend"]}


@pytest.mark.parametrize("method", sorted(WRAPPER_SIGNATURES))
def test_wrapper_signatures(method: str) -> None:
    kw_only = "spatial_key" if method == "setup_data" else None
    _assert_signature(getattr(SplisosmGLMM, method), WRAPPER_SIGNATURES[method], kw_only)
    params = [p for name, p in inspect.signature(getattr(SplisosmGLMM, method)).parameters.items()
              if name != "self"]
    # 1.2.0's arguments come first (checked above); ours may only follow them, with defaults
    extra = params[len(WRAPPER_SIGNATURES[method]):]
    assert [p.name for p in extra] == EXTRA_ARGUMENTS.get(method, [])
    assert all(p.default is not inspect.Parameter.empty for p in extra)


def test_wrapper_members() -> None:
    assert isinstance(inspect.getattr_static(SplisosmGLMM, "load"), staticmethod)
    assert isinstance(inspect.getattr_static(SplisosmGLMM, "filtered_adata"), property)
    for name in ("__getitem__", "__str__", "__repr__"):
        assert name in vars(SplisosmGLMM)
    fresh = SplisosmGLMM()
    for attr in ("adata", "n_genes", "n_spots", "n_isos_per_gene", "n_factors", "gene_names",
                 "covariate_names", "design_mtx", "sp_kernel"):
        assert getattr(fresh, attr) is None, attr
    with pytest.raises(RuntimeError):
        _ = fresh.filtered_adata


PER_GENE_SIGNATURES = [
    (MultinomGLMM.__init__, [
        ("share_variance", True), ("var_fix_sigma", True), ("var_prior_model", "none"),
        ("var_prior_model_params", None), ("init_ratio", "uniform"), ("fitting_method", "joint_gd"),
        ("fitting_configs", None),
    ]),
    (MultinomGLMM.setup_data, [
        ("counts", REQUIRED), ("corr_sp", None), ("design_mtx", None), ("device", "cpu"),
        ("corr_sp_eigvals", None), ("corr_sp_eigvecs", None),
    ]),
    (MultinomGLMM.fit, [
        ("store_param_history", False), ("verbose", False), ("quiet", False), ("random_seed", None),
        ("diagnose", None),
    ]),
    (MultinomGLM.__init__, [("fitting_method", "iwls"), ("fitting_configs", None)]),
    (MultinomGLM.setup_data, [("counts", REQUIRED), ("design_mtx", None), ("device", "cpu")]),
    (MultinomGLM.fit, [
        ("store_param_history", False), ("verbose", False), ("quiet", False), ("random_seed", None),
        ("diagnose", None),
    ]),
    (SpatialCovKernel.__init__, [
        ("coords", None), ("adj_matrix", None), ("k_neighbors", 4), ("rho", 0.99),
        ("standardize_cov", True), ("centering", False),
    ]),
    (SpatialCovKernel.from_coordinates, [
        ("coords", REQUIRED), ("k_neighbors", 4), ("rho", 0.99), ("standardize_cov", True),
        ("centering", False),
    ]),
    (SpatialCovKernel.from_adjacency, [
        ("adj_matrix", REQUIRED), ("rho", 0.99), ("standardize_cov", True), ("centering", False),
    ]),
    (SpatialCovKernel.eigenvalues, [("k", None)]),
    (IdentityKernel.__init__, [("n", REQUIRED), ("centering", False)]),
]


@pytest.mark.parametrize(("func", "expected"), PER_GENE_SIGNATURES,
                         ids=[f.__qualname__ for f, _ in PER_GENE_SIGNATURES])
def test_per_gene_and_kernel_signatures(func, expected) -> None:
    _assert_signature(func, expected)


def test_per_gene_and_kernel_members() -> None:
    for cls in (MultinomGLM, MultinomGLMM):
        for name in ("setup_data", "fit", "forward", "get_isoform_ratio", "clone",
                     "update_params_from_dict"):
            assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"
    for name in ("eigenvalues", "eigendecomposition", "realization", "Kx", "xtKx", "xtKx_exact",
                 "xtKx_approx", "trace", "square_trace"):
        assert callable(getattr(SpatialCovKernel, name, None)), name
    kern = SpatialCovKernel(grid_coords(4))
    kern.eigendecomposition()
    for attr in ("K_sp", "K_eigvals", "K_eigvecs", "Q", "inv_cov"):
        assert getattr(kern, attr) is not None, attr


def test_kernel_keywords_of_1_2_0() -> None:
    coords = grid_coords(8)
    adj = mutual_knn_adjacency(coords, 4)
    by_position = SpatialCovKernel(coords).K_sp
    torch.testing.assert_close(SpatialCovKernel(coords=coords).K_sp, by_position)
    torch.testing.assert_close(SpatialCovKernel(adj_matrix=adj).K_sp, by_position)
    torch.testing.assert_close(SpatialCovKernel.from_adjacency(adj_matrix=adj).K_sp, by_position)
    with pytest.raises(ValueError, match="coords"):
        SpatialCovKernel(coords=coords, adj_matrix=adj)


# ------------------------------------------------------------------------------ a 1.2.0 script
@pytest.fixture(scope="module")
def adata():
    return make_adata(side=6, n_isos=(2, 3, 2, 3), du_effect=(1.0, 0.0, 0.0, 0.0))


def test_api_page_example_runs_unchanged(adata) -> None:
    model = SplisosmGLMM(model_type="glmm-full", fitting_method="joint_gd", device="cpu",
                         fitting_configs=dict(FAST))
    model.setup_data(adata, layer="counts", group_iso_by="gene_symbol", group_gene_by_n_iso=True,
                     design_mtx="cov")
    model.fit(n_jobs=1, batch_size=20, with_design_mtx=False, print_progress=False)
    fitted_models = model.get_fitted_models()
    assert len(fitted_models) == 4 and all(type(m) is IsoFullModel for m in fitted_models)
    model.test_differential_usage(method="score", print_progress=False)
    du_results = model.get_formatted_test_results("du")
    assert list(du_results.columns) == ["gene", "covariate", "statistic", "pvalue", "pvalue_adj", "converged"]
    assert du_results.shape == (4, 6) and list(du_results["covariate"]) == ["cov"] * 4
    assert model["G0"].n_isos == 2 and type(model.get_gene_model("G1")) is IsoFullModel


@pytest.mark.parametrize(("model_type", "cls"), [("glmm-null", IsoNullNoSpVar), ("glm", MultinomGLM)])
def test_fitted_model_types(adata, model_type, cls) -> None:
    model = SplisosmGLMM(model_type=model_type, fitting_configs=dict(FAST))
    model.setup_data(adata)
    model.fit(print_progress=False)
    assert all(type(m) is cls for m in model.get_fitted_models())


def _messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)]


def test_batch_size_without_grouping_warning(adata) -> None:
    model = SplisosmGLMM(model_type="glm")
    model.setup_data(adata, group_gene_by_n_iso=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(batch_size=2, print_progress=False)
    # filterwarnings(message=...) patterns match at the start of the text
    assert any(m.startswith("Ignoring batch size argument") for m in _messages(record))
    assert model.fit_record.info()["batch_size"] == 1

    grouped = SplisosmGLMM(model_type="glm")
    grouped.setup_data(adata, group_gene_by_n_iso=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        grouped.fit(batch_size=2, print_progress=False)
    assert not any("Ignoring batch size" in m for m in _messages(record))
    assert grouped.fit_record.info()["batch_size"] == 2


def test_cached_permutation_results_message(adata, capsys) -> None:
    model = SplisosmGLMM(model_type="glmm-full", fitting_configs=dict(FAST))
    model.setup_data(adata.copy(), group_gene_by_n_iso=True)
    model.fit(from_null=True, batch_size=4, print_progress=False)
    capsys.readouterr()
    kwargs = dict(use_perm_null=True, n_perms_per_gene=2, print_progress=False, return_results=True)
    first = model.test_spatial_variability(**kwargs)
    assert "Using cached permutation results..." not in capsys.readouterr().out
    second = model.test_spatial_variability(**kwargs)
    assert "Using cached permutation results..." in capsys.readouterr().out
    np.testing.assert_array_equal(first["pvalue"], second["pvalue"])


# ------------------------------------------------------------------------------ per-gene models
@pytest.fixture(scope="module")
def gene_data():
    K = car_kernel(4)
    Y = simulate_counts(K, 2, 3, seed=3).float()
    lam, V = np.linalg.eigh(K)
    evals = torch.from_numpy(lam[::-1].copy()).float()
    evecs = torch.from_numpy(V[:, ::-1].copy()).float()
    X = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))
    return Y, evals, evecs, X


def _glmm(cls, gene_data, **kw):
    Y, evals, evecs, X = gene_data
    model = cls(fitting_configs=dict(FAST), **kw)
    model.setup_data(Y, design_mtx=X, corr_sp_eigvals=evals, corr_sp_eigvecs=evecs)
    return model


def test_null_to_full_restarts_a_learned_sigma_from_the_spread(gene_data) -> None:
    null = _glmm(IsoNullNoSpVar, gene_data, var_fix_sigma=False)
    null.fit(quiet=True)
    full = IsoFullModel.from_trained_null(null)
    spread = null.nu.detach().std(dim=1).amax(-1, keepdim=True).clamp(min=0.1)
    torch.testing.assert_close(full.sigma.detach(), spread)
    assert full.sigma.requires_grad


def test_conversion_names_of_1_2_0_are_aliases() -> None:
    assert IsoFullModel.from_trained_null_no_sp_var_model.__func__ is IsoFullModel.from_trained_null.__func__
    assert IsoNullNoSpVar.from_trained_full_model.__func__ is IsoNullNoSpVar.from_trained_full.__func__


def test_conversions_round_trip(gene_data) -> None:
    null = _glmm(IsoNullNoSpVar, gene_data)
    null.fit(quiet=True)
    full = IsoFullModel.from_trained_null_no_sp_var_model(null)
    assert type(full) is IsoFullModel and full.logger is None and full.fitting_time == 0
    assert not full.convergence.any()
    for name in ("nu", "beta", "bias_eta"):
        torch.testing.assert_close(getattr(full, name), getattr(null, name))
    assert torch.all(full.theta_logit == -3.0) and full.theta_logit.requires_grad
    # a fixed sigma keeps the null's value, so the full model is the one a direct fit uses
    torch.testing.assert_close(full.sigma.detach(), null.sigma.detach())
    full.fit(quiet=True)
    assert full.logger is not None

    back = IsoNullNoSpVar.from_trained_full_model(full)
    assert type(back) is IsoNullNoSpVar and back.logger is None
    assert torch.all(torch.isneginf(back.theta_logit)) and not back.theta_logit.requires_grad
    for name in ("nu", "beta", "bias_eta", "sigma"):
        torch.testing.assert_close(getattr(back, name), getattr(full, name))
    back.fit(quiet=True)
    assert torch.all(torch.isneginf(back.theta_logit))


@pytest.mark.parametrize("cls", [MultinomGLMM, IsoFullModel, IsoNullNoSpVar])
def test_glmm_str(cls, gene_data) -> None:
    model = _glmm(cls, gene_data, init_ratio="observed")
    lines = str(model).splitlines()
    assert lines[0] == GLMM_TITLE
    body = "\n".join(lines[1:])
    for part in (cls.__name__, "Genes in batch: 2", "Spots: 16", "Isoforms per gene: 3",
                 "Covariates: 1", "observed", "joint_gd", "not fitted"):
        assert part in body, part
    assert repr(model) == str(model)
    model.fit(quiet=True)
    text = str(model)
    assert text.splitlines()[0] == GLMM_TITLE and "not fitted" not in text
    assert f"{int(model.convergence.sum())} / 2 genes converged" in text


def test_glm_str(gene_data) -> None:
    Y, _, _, X = gene_data
    model = MultinomGLM()
    model.setup_data(Y, design_mtx=X)
    assert str(model).splitlines()[0] == GLM_TITLE and repr(model) == str(model)
    assert "iwls" in str(model) and "not fitted" in str(model)
    model.fit(quiet=True)
    assert "genes converged" in str(model)


def test_public_model_attributes_of_1_2_0(gene_data) -> None:
    model = _glmm(IsoFullModel, gene_data)
    _, _, _, X = gene_data
    assert model.X_spot.shape == (1, 16, 1)
    torch.testing.assert_close(model.X_spot[0], X)
    assert model.convergence.shape == (2,) and model.convergence.dtype == torch.bool
    assert not model.convergence.any()
    model.fit(quiet=True)
    assert torch.equal(model.convergence, model.logger.converged)
    assert model.logger.convergence is model.logger.converged
    assert model.logger.best_loss.shape == (2,) and model.logger.best_epoch.shape == (2,)
    assert model.get_isoform_ratio().shape == (2, 16, 3)
    for attr in ("n_genes", "n_spots", "n_isos", "n_factors", "fitting_method", "fitting_configs",
                 "fitting_time", "counts", "corr_sp_eigvals", "corr_sp_eigvecs"):
        assert getattr(model, attr) is not None, attr


def test_kernel_eigenvalues_also_sets_the_eigenvectors() -> None:
    kernel = SpatialCovKernel(grid_coords(4), k_neighbors=4, rho=0.9)
    evals = kernel.eigenvalues(5)
    assert kernel.K_eigvecs is not None and kernel.K_eigvecs.shape == (16, 5)
    torch.testing.assert_close(kernel.K_eigvals, evals)
    lam, vec = kernel.eigenpairs(5)
    torch.testing.assert_close(kernel.K_eigvecs, vec)
    torch.testing.assert_close(kernel.Q @ kernel.Q.T, (vec * lam) @ vec.T)
