"""SplisosmGLMM construction and setup_data: validation, filters, design forms, kernels."""

from __future__ import annotations

import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import splisosm
import splisosm.spatial.kernel
from helpers.glmm_data import grid_coords, make_adata
from splisosm.data._dataset import make_batches
from splisosm.hyptest_glmm import SplisosmGLMM
from splisosm.spatial.kernel import IdentityKernel, SpatialCovKernel


@pytest.fixture
def adata() -> ad.AnnData:
    return make_adata()


def _setup(adata, model_type: str = "glm", **kwargs) -> SplisosmGLMM:
    model = SplisosmGLMM(model_type=model_type)
    model.setup_data(adata, **kwargs)
    return model


# ------------------------------------------------------------------------------ constructor
def test_package_root_export() -> None:
    assert splisosm.SplisosmGLMM is SplisosmGLMM


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model_type": "glmm"}, "model_type"),
        ({"fitting_method": "newton"}, "fitting_method"),
        ({"init_ratio": "random"}, "init_ratio"),
        ({"var_prior_model": "lognormal"}, "var_prior_model"),
        ({"fitting_configs": {"optim": "rmsprop"}}, "optim"),
        ({"fitting_method": "joint_newton"}, "var_fix_sigma"),
        ({"model_type": "glmm-null", "fitting_method": "joint_newton", "var_fix_sigma": False}, "fitting_method"),
        ({"device": "cpu:0"}, "device"),
        ({"k_neighbors": 0}, "k_neighbors"),
        ({"approx_rank": 0}, "approx_rank"),
        ({"fitting_configs": [1]}, "fitting_configs"),
    ],
)
def test_constructor_rejects_bad_options(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SplisosmGLMM(**kwargs)


def test_glm_ignores_glmm_options() -> None:
    with pytest.warns(UserWarning, match="`fitting_method` and `fitting_configs` are ignored") as record:
        model = SplisosmGLMM(model_type="glm", fitting_method="bogus")
    assert record[0].filename == __file__
    assert model.model_configs["fitting_method"] == "bogus"


def test_fitting_configs_copied_and_default_merged() -> None:
    user = {"lr": 0.05}
    model = SplisosmGLMM(fitting_configs=user)
    assert user == {"lr": 0.05}
    assert model.model_configs["fitting_configs"] == {"max_epochs": 500, "lr": 0.05}
    assert SplisosmGLMM(fitting_configs={"max_epochs": 7}).model_configs["fitting_configs"] == {"max_epochs": 7}
    assert SplisosmGLMM().model_configs["fitting_configs"] == {"max_epochs": 500}


def test_prior_defaults() -> None:
    inv = SplisosmGLMM(var_prior_model="inv_gamma").model_configs["var_prior_model_params"]
    assert inv == {"alpha": 3.0, "beta": 0.5}
    gam = SplisosmGLMM(var_prior_model="gamma", var_prior_model_params={"beta": 1.0})
    assert gam.model_configs["var_prior_model_params"] == {"alpha": 2.0, "beta": 1.0}


def test_attributes_none_before_setup() -> None:
    model = SplisosmGLMM()
    for attr in ("adata", "n_genes", "n_spots", "n_isos_per_gene", "n_factors", "gene_names",
                 "covariate_names", "design_mtx", "sp_kernel"):
        assert getattr(model, attr) is None
    with pytest.raises(RuntimeError):
        _ = model.filtered_adata
    with pytest.raises(RuntimeError):
        model.fit()


# ------------------------------------------------------------------------------ validation
def test_rejects_non_anndata() -> None:
    with pytest.raises(ValueError, match="AnnData"):
        SplisosmGLMM().setup_data(np.zeros((4, 4)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer": "raw"}, "layer"),
        ({"group_iso_by": "gene_id"}, "group_iso_by"),
        ({"min_counts": -1}, "min_counts"),
        ({"min_bin_pct": 101}, "min_bin_pct"),
        ({"min_bin_pct": -0.1}, "min_bin_pct"),
        ({"gene_names": ["a", "b"]}, "gene_names"),
        ({"gene_names": "missing_col"}, "gene_names"),
        ({"min_component_size": 2.0}, "min_component_size"),
        ({"min_component_size": 0}, "min_component_size"),
        ({"design_mtx": np.zeros((5, 1))}, "rows"),
        ({"spatial_key": "xy"}, "spatial"),
        ({"adj_key": "graph"}, "adj_key"),
        ({"design_mtx": "nope"}, "nope"),
        ({"design_mtx": ["cov", "nope2"]}, "nope2"),
        ({"min_counts": 10**9}, "No isoform"),
    ],
)
def test_setup_rejects_bad_arguments(adata, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _setup(adata, **kwargs)


@pytest.mark.parametrize(
    "values, match",
    [(-1.0, "negative"), (0.5, "non-integer"), (np.nan, "NaN")],
)
def test_setup_rejects_bad_counts(adata, values, match) -> None:
    counts = np.array(adata.layers["counts"])
    counts[0, 0] = values
    adata.layers["counts"] = counts
    with pytest.raises(ValueError, match=match):
        _setup(adata)


def test_setup_rejects_non_2d_counts(adata) -> None:
    adata.layers["stacked"] = np.zeros(adata.shape + (2,))
    with pytest.raises(ValueError, match="2-D"):
        _setup(adata, layer="stacked")


def test_setup_rejects_non_2d_coordinates(adata) -> None:
    adata.obsm["spatial"] = np.zeros((adata.n_obs, 2, 1))
    with pytest.raises(ValueError, match="2-D"):
        _setup(adata)


def test_all_genes_single_isoform_rejected(adata) -> None:
    counts = np.array(adata.layers["counts"])
    counts[:, [1, 3, 4, 6, 8, 9]] = 0  # leave every gene with one expressed isoform
    adata.layers["counts"] = counts
    with pytest.warns(UserWarning, match="genes were dropped"):
        with pytest.raises(ValueError, match="No gene"):
            _setup(adata)


def test_single_isoform_gene_dropped_with_warning(adata) -> None:
    counts = np.array(adata.layers["counts"])
    counts[:, 1] = 0  # gene G0 (2 isoforms) keeps one
    adata.layers["counts"] = counts
    with pytest.warns(UserWarning, match="1 genes were dropped"):
        model = _setup(adata)
    assert model.gene_names == ["G1", "G2", "G3"]


def test_unsupported_design_type(adata) -> None:
    with pytest.raises(TypeError, match="design_mtx"):
        _setup(adata, design_mtx=[1.0] * adata.n_obs)


def test_nan_in_design(adata) -> None:
    x = np.ones(adata.n_obs, dtype=np.float32)
    x[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _setup(adata, design_mtx=np.stack([np.arange(adata.n_obs), x], 1))


def test_constant_design_column_warns_per_column(adata) -> None:
    design = np.stack([np.ones(adata.n_obs), np.zeros(adata.n_obs), np.arange(adata.n_obs)], 1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        model = _setup(adata, design_mtx=design)
    near_zero = [w for w in record if "near-zero variance" in str(w.message)]
    assert len(near_zero) == 2
    assert model.n_factors == 3


def test_covariate_names_override_and_length(adata) -> None:
    model = _setup(adata, design_mtx=np.random.rand(adata.n_obs, 2), covariate_names=["a", "b"])
    assert model.covariate_names == ["a", "b"]
    with pytest.raises(ValueError, match="covariate_names"):
        _setup(adata, design_mtx=np.random.rand(adata.n_obs, 2), covariate_names=["a"])


# ------------------------------------------------------------------------------ design forms
def test_design_forms(adata) -> None:
    n = adata.n_obs
    x = np.asarray(adata.obs["cov"], dtype=np.float32)
    cases = {
        "cov": (["cov"], x[:, None]),
        "flag": (["flag"], adata.obs["flag"].to_numpy(np.float32)[:, None]),
    }
    for design, (names, matrix) in cases.items():
        model = _setup(adata, design_mtx=design)
        assert model.covariate_names == names
        np.testing.assert_array_equal(model.design_mtx.numpy(), matrix)
    model = _setup(adata, design_mtx=["cov", "region"])
    assert model.covariate_names == ["cov", "region_left", "region_right"]
    assert model.n_factors == 3
    np.testing.assert_array_equal(model.design_mtx[:, 1:].sum(1).numpy(), np.ones(n))
    df = pd.DataFrame({"u": x, "v": x * 2})
    model = _setup(adata, design_mtx=df)
    assert model.covariate_names == ["u", "v"] and model.design_mtx.dtype == torch.float32
    for arr in (torch.from_numpy(x[:, None]), sp.csr_matrix(x[:, None]), x):
        model = _setup(adata, design_mtx=arr)
        assert model.covariate_names == ["factor_1"]
        np.testing.assert_allclose(model.design_mtx.numpy()[:, 0], x)


def test_object_column_is_one_hot(adata) -> None:
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 3 == 0, "a", "b").astype(object)
    model = _setup(adata, design_mtx="batch")
    assert model.covariate_names == ["batch_a", "batch_b"]


# ------------------------------------------------------------------------------ data layout
def test_gene_order_display_names_and_filtered_adata() -> None:
    adata = make_adata(n_isos=(2, 3, 2))
    # Interleave isoforms of genes so grouping must make them contiguous.
    order = [2, 0, 3, 5, 1, 4, 6]
    adata = adata[:, order].copy()
    model = SplisosmGLMM(model_type="glm")
    model.setup_data(adata, gene_names="gene_label")
    assert model.gene_names == ["Label1", "Label0", "Label2"]
    assert model.n_isos_per_gene == [3, 2, 2]
    assert model.n_genes == 3 and model.n_spots == adata.n_obs
    fa = model.filtered_adata
    assert fa.shape == (adata.n_obs, 7)
    assert list(fa.var_names) == ["G1_T0", "G1_T1", "G1_T2", "G0_T0", "G0_T1", "G2_T0", "G2_T1"]
    assert model.adata is adata
    assert fa is not adata


def test_filters_min_counts_and_bin_pct(adata) -> None:
    counts = np.array(adata.layers["counts"])
    counts[:, 2] = 0
    counts[:5, 2] = 3  # 15 counts in 5 of 64 spots (7.8 %)
    adata.layers["counts"] = counts
    assert _setup(adata, min_counts=10).n_isos_per_gene == [2, 3, 2, 3]
    assert _setup(adata, min_counts=16).n_isos_per_gene == [2, 2, 2, 3]
    assert _setup(adata, min_bin_pct=0.1).n_isos_per_gene == [2, 2, 2, 3]
    assert _setup(adata, min_bin_pct=7).n_isos_per_gene == [2, 3, 2, 3]  # 7 %


def test_sparse_layer_matches_dense() -> None:
    dense = _setup(make_adata(seed=3))
    sparse = _setup(make_adata(seed=3, sparse=True))
    assert dense.gene_names == sparse.gene_names
    for a, b in zip(dense.setup_record.genes.counts, sparse.setup_record.genes.counts):
        torch.testing.assert_close(a, b)


def test_make_batches() -> None:
    n_isos = [3, 2, 3, 2, 2, 4]
    assert make_batches(n_isos, False, 5) == [[0], [1], [2], [3], [4], [5]]
    assert make_batches(n_isos, True, 2) == [[1, 3], [4], [0, 2], [5]]
    # the same order chunked as one sequence, for fitters that fit isoform counts together
    assert make_batches(n_isos, True, 2, mix_isoform_counts=True) == [[1, 3], [4, 0], [2, 5]]


# ------------------------------------------------------------------------------ space
def test_kernels_by_model_type(adata) -> None:
    assert _setup(adata, "glm").sp_kernel is None
    null = _setup(adata, "glmm-null")
    assert isinstance(null.sp_kernel, IdentityKernel)
    assert null.setup_record.kernel.eigvecs.shape == (adata.n_obs, 1)
    full = _setup(adata, "glmm-full")
    assert isinstance(full.sp_kernel, SpatialCovKernel)
    assert full.setup_record.kernel.eigvecs.shape == (adata.n_obs, adata.n_obs)


def test_rank_selection(adata, monkeypatch) -> None:
    model = SplisosmGLMM(approx_rank=10)
    model.setup_data(adata)
    assert model.setup_record.kernel.eigvecs.shape == (64, 10) and model.setup_record.kernel.precision is None
    monkeypatch.setattr(splisosm.spatial.kernel, "DENSE_THRESHOLD", 50)
    model = SplisosmGLMM()
    model.setup_data(adata)
    assert model.setup_record.kernel.eigvecs.shape == (64, math.ceil(4 * 8))
    model = SplisosmGLMM(approx_rank=None)
    with pytest.warns(UserWarning, match="approx_rank=None"):
        model.setup_data(adata)
    assert model.setup_record.kernel.eigvecs is None and model.setup_record.kernel.precision.shape == (64, 64)


@pytest.mark.parametrize("rho", [1.0, -0.1, "high", float("nan")])
def test_invalid_rho_at_construction(rho) -> None:
    with pytest.raises(ValueError, match="`rho` must be"):
        SplisosmGLMM(rho=rho)


def test_duplicate_coordinates_warn(adata) -> None:
    coords = np.array(adata.obsm["spatial"])
    coords[1] = coords[0]
    adata.obsm["spatial"] = coords
    with pytest.warns(UserWarning, match="share coordinates"):
        _setup(adata)


def _two_islands() -> ad.AnnData:
    adata = make_adata(side=6)
    coords = grid_coords(6)
    coords[-2:] += 100.0  # two far-away spots forming their own component
    adata.obsm["spatial"] = coords
    return adata


def test_disconnected_graph_warns() -> None:
    with pytest.warns(UserWarning, match="min_component_size"):
        _setup(_two_islands(), "glmm-full")


def test_component_filter_subsets_everything() -> None:
    adata = _two_islands()
    design_1d = np.arange(adata.n_obs, dtype=np.float32)
    with pytest.warns(UserWarning, match="Removed 2 spots"):
        model = _setup(adata, "glmm-full", min_component_size=5, design_mtx=design_1d)
    assert model.n_spots == adata.n_obs - 2
    np.testing.assert_array_equal(model.design_mtx[:, 0].numpy(), design_1d[:-2])
    assert model.filtered_adata.n_obs == model.n_spots
    with pytest.raises(ValueError, match="All"):
        _setup(adata, min_component_size=1000)


def test_adjacency_symmetrised(adata) -> None:
    n = adata.n_obs
    adj = sp.diags([np.ones(n - 1)], [1], shape=(n, n)).tocsr()  # a directed chain
    adata.obsp["chain"] = adj
    with pytest.warns(RuntimeWarning, match="symmetri"):
        model = _setup(adata, "glmm-full", adj_key="chain")
    assert model.sp_kernel.n_spots == n
    del adata.obsm["spatial"]
    adata.obsp["chain"] = adj + adj.T
    model = _setup(adata, "glmm-full", adj_key="chain")
    assert isinstance(model.sp_kernel, SpatialCovKernel)


def test_setup_resets_previous_state(adata) -> None:
    model = _setup(adata, design_mtx="cov")
    model.setup_data(adata)
    assert model.design_mtx is None and model.n_factors == 0 and model.covariate_names is None
