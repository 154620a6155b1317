"""Simulated isoform data: layout, reproducibility, stored truth and visible effects."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from splisosm.data.simulation import simulate_isoform_data


def gene_blocks(adata: ad.AnnData) -> list[np.ndarray]:
    """Counts of each gene, ``(n, m_j)``, in gene order."""
    symbols = adata.var["gene_symbol"].to_numpy()
    starts = np.r_[0, np.flatnonzero(symbols[1:] != symbols[:-1]) + 1, len(symbols)]
    counts = np.asarray(adata.layers["counts"])
    return [counts[:, a:b] for a, b in zip(starts[:-1], starts[1:])]


def test_layout_and_names():
    adata = simulate_isoform_data(n_genes=12, n_isoforms=3, grid_size=(8, 5), seed=1)
    assert isinstance(adata, ad.AnnData) and adata.shape == (40, 36)
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    assert list(adata.var.columns) == [
        "gene_symbol", "transcript_id", "true_intercept", "true_beta_covariate"
    ]
    symbols = adata.var["gene_symbol"]
    assert symbols.iloc[0] == "gene_0000" and symbols.iloc[-1] == "gene_0011"
    assert (adata.var["transcript_id"] == adata.var_names).all()
    assert adata.obsm["spatial"].shape == (40, 2) and adata.obsm["spatial"].dtype == np.float64
    assert list(adata.obs.columns) == ["covariate"]
    assert set(np.unique(adata.obs["covariate"])) == {0.0, 1.0}
    counts = adata.layers["counts"]
    assert counts.dtype == np.float32 and np.all(counts == np.round(counts)) and counts.min() >= 0
    np.testing.assert_array_equal(adata.X, counts)
    assert adata.X is not counts


def test_default_grid_and_random_layout():
    assert simulate_isoform_data(n_genes=2).n_obs == 900
    adata = simulate_isoform_data(n_genes=2, n_spots=150, seed=3)
    coords = adata.obsm["spatial"]
    assert adata.n_obs == 150 and coords.min() >= 0 and coords.max() <= np.sqrt(150)
    with pytest.raises(ValueError):
        simulate_isoform_data(n_genes=2, grid_size=(5, 5), n_spots=25)


def test_variable_isoform_numbers_and_several_covariates():
    adata = simulate_isoform_data(
        n_genes=4, n_isoforms=np.array([2, 4, 3, 2]), grid_size=(6, 6), n_covariates=3,
        covariate="continuous",
    )
    json.dumps(adata.uns["simulation"])  # numpy arguments are stored as plain Python
    assert adata.n_vars == 11
    assert [b.shape[1] for b in gene_blocks(adata)] == [2, 4, 3, 2]
    assert list(adata.obs.columns) == ["covariate_1", "covariate_2", "covariate_3"]
    np.testing.assert_allclose(adata.obs.to_numpy().mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(adata.obs.to_numpy().std(0), 1.0, rtol=1e-12)
    assert adata.uns["simulation"]["genes"]["n_isoforms"] == [2, 4, 3, 2]
    truth_columns = ["true_intercept", "true_beta_covariate_1", "true_beta_covariate_2",
                     "true_beta_covariate_3"]
    assert list(adata.var.columns[2:]) == truth_columns
    # NaN exactly on the last isoform of each gene, the reference
    reference = np.zeros(11, dtype=bool)
    reference[[1, 5, 8, 10]] = True
    for column in truth_columns:
        np.testing.assert_array_equal(adata.var[column].isna().to_numpy(), reference)
    with pytest.raises(ValueError):
        simulate_isoform_data(n_genes=2, n_isoforms=[3, 1])


def test_seed_reproducibility():
    first = simulate_isoform_data(n_genes=5, grid_size=(6, 6), du_fraction=0.4, seed=7)
    again = simulate_isoform_data(n_genes=5, grid_size=(6, 6), du_fraction=0.4, seed=7)
    other = simulate_isoform_data(n_genes=5, grid_size=(6, 6), du_fraction=0.4, seed=8)
    np.testing.assert_array_equal(first.layers["counts"], again.layers["counts"])
    np.testing.assert_array_equal(first.obs.to_numpy(), again.obs.to_numpy())
    assert first.uns["simulation"] == again.uns["simulation"]
    pd.testing.assert_frame_equal(first.var, again.var)
    assert not np.array_equal(first.layers["counts"], other.layers["counts"])


def test_truth_is_plain_and_consistent():
    adata = simulate_isoform_data(
        n_genes=20,
        grid_size=(6, 6),
        du_fraction=0.25,
        sv_fraction=0.5,
        theta=0.7,
        n_covariates=2,
        seed=2,
    )
    truth = adata.uns["simulation"]
    json.dumps(truth)  # plain Python only
    assert truth["params"]["du_fraction"] == 0.25 and truth["params"]["seed"] == 2
    assert truth["params"]["grid_size"] == [6, 6] and "n_spots" not in truth["params"]
    assert truth["covariate_names"] == ["covariate_1", "covariate_2"]
    genes = truth["genes"]
    assert set(genes) == {"gene_symbol", "n_isoforms", "is_sv", "is_du", "theta", "depth_scale"}
    assert sum(genes["is_du"]) == 5 and sum(genes["is_sv"]) == 10
    for is_sv, theta in zip(genes["is_sv"], genes["theta"]):
        assert theta == (0.7 if is_sv else 0.0)


def assert_same_uns(read: object, written: object) -> None:
    """``read`` holds the values of ``written`` (lists come back from h5ad as numpy arrays)."""
    if isinstance(written, dict):
        assert isinstance(read, dict) and set(read) == set(written)
        for key, value in written.items():
            assert_same_uns(read[key], value)
    elif isinstance(written, list):
        assert isinstance(read, np.ndarray) and read.tolist() == written
    else:
        assert type(read) is type(written) and read == written


@pytest.mark.parametrize(
    "kwargs",
    [
        {"grid_size": (5, 4), "n_covariates": 1, "du_fraction": 0.5},
        {"grid_size": (5, 4), "n_covariates": 3, "n_isoforms": [2, 3, 4], "covariate": "continuous",
         "du_fraction": 0.5},
        {"grid_size": (5, 4), "n_covariates": 0, "n_isoforms": [2, 3, 4]},
        {"n_spots": 30, "n_isoforms": np.array([4, 2, 3]), "du_fraction": 1.0},
    ],
)
def test_h5ad_round_trip_loses_nothing(tmp_path, kwargs):
    adata = simulate_isoform_data(n_genes=3, **kwargs)
    # write_h5ad turns string columns into categoricals in place: snapshot before writing
    expected = adata.copy()
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    read = ad.read_h5ad(path)

    np.testing.assert_array_equal(read.X, expected.X)
    assert read.X.dtype == np.float32 and set(read.layers) == {"counts"}
    np.testing.assert_array_equal(read.layers["counts"], expected.layers["counts"])
    pd.testing.assert_frame_equal(read.obs, expected.obs)
    assert isinstance(read.var["gene_symbol"].dtype, pd.CategoricalDtype)
    var = read.var.astype({"gene_symbol": object})
    pd.testing.assert_frame_equal(var, expected.var)
    n_covariates = kwargs.get("n_covariates", 1)
    assert var.filter(like="true_beta_").shape[1] == n_covariates
    np.testing.assert_array_equal(read.obsm["spatial"], expected.obsm["spatial"])
    assert set(read.uns) == {"simulation"}
    assert_same_uns(read.uns["simulation"], expected.uns["simulation"])
    assert len(read.uns["simulation"]["covariate_names"]) == n_covariates

    # the stored arguments are enough to simulate the same data again
    again = simulate_isoform_data(**read.uns["simulation"]["params"])
    np.testing.assert_array_equal(again.layers["counts"], expected.layers["counts"])
    pd.testing.assert_frame_equal(again.var, expected.var)


def test_none_arguments_are_omitted_from_params():
    params = simulate_isoform_data(n_genes=2, n_spots=20).uns["simulation"]["params"]
    assert "grid_size" not in params and params["n_spots"] == 20
    params = simulate_isoform_data(n_genes=2).uns["simulation"]["params"]
    assert "grid_size" not in params and "n_spots" not in params
    assert None not in params.values()


def test_var_truth_columns_hold_the_simulated_effects():
    n_isoforms = [2, 3, 4] * 4
    adata = simulate_isoform_data(
        n_genes=12, n_isoforms=n_isoforms, grid_size=(20, 20), n_covariates=1, du_fraction=0.5,
        effect_size=0.75, spatial_var=0.0, mean_depth=200.0, depth_sd=0.0, seed=9,
    )
    genes = adata.uns["simulation"]["genes"]
    assert sum(genes["is_du"]) == 6
    reference = np.cumsum(n_isoforms) - 1
    is_reference = np.isin(np.arange(adata.n_vars), reference)
    is_du = np.repeat(genes["is_du"], n_isoforms)
    beta = adata.var["true_beta_covariate"].to_numpy()
    intercept = adata.var["true_intercept"].to_numpy()
    assert np.isnan(beta[is_reference]).all() and np.isnan(intercept[is_reference]).all()
    assert not np.isnan(beta[~is_reference]).any() and not np.isnan(intercept[~is_reference]).any()
    np.testing.assert_array_equal(np.abs(beta[~is_reference & is_du]), 0.75)
    np.testing.assert_array_equal(beta[~is_reference & ~is_du], 0.0)
    assert len(np.unique(intercept[~is_reference])) == (~is_reference).sum()

    # without random effects the pooled log-ratio to the gene's reference isoform estimates
    # the intercept in group 0 and intercept + beta in group 1, isoform by isoform
    counts = adata.layers["counts"].astype(np.float64)
    reference_of = np.repeat(reference, n_isoforms)
    group = adata.obs["covariate"].to_numpy() == 1.0
    for in_group, expected in ((~group, intercept), (group, intercept + beta)):
        totals = counts[in_group].sum(axis=0)
        log_ratio = np.log(totals / totals[reference_of])
        np.testing.assert_allclose(log_ratio[~is_reference], expected[~is_reference], atol=0.1)


def test_depth_matches_mean_depth():
    adata = simulate_isoform_data(
        n_genes=50, grid_size=(10, 10), mean_depth=8.0, depth_sd=0.0, seed=4
    )
    totals = np.array([b.sum(1).mean() for b in gene_blocks(adata)])
    assert totals.mean() == pytest.approx(8.0, rel=0.02)


def test_differential_usage_visible_in_ratios():
    adata = simulate_isoform_data(
        n_genes=40,
        grid_size=(20, 20),
        du_fraction=0.5,
        effect_size=1.5,
        spatial_var=0.2,
        mean_depth=20.0,
        seed=5,
    )
    group = adata.obs["covariate"].to_numpy() == 1.0
    genes = adata.uns["simulation"]["genes"]
    beta_blocks = np.split(
        adata.var["true_beta_covariate"].to_numpy(), np.cumsum(genes["n_isoforms"])[:-1]
    )
    shifts, betas, flags = [], [], []
    for block, beta, is_du in zip(gene_blocks(adata), beta_blocks, genes["is_du"]):
        # pooled log-ratio of each non-reference isoform to the reference, group 1 minus group 0
        pooled = [
            np.log((block[g, :-1].sum(0) + 0.5) / (block[g, -1].sum() + 0.5))
            for g in (group, ~group)
        ]
        shifts.extend(pooled[0] - pooled[1])
        betas.extend(beta[:-1])
        flags.extend([is_du] * (len(beta) - 1))
    shifts, betas, flags = map(np.asarray, (shifts, betas, flags))
    assert np.mean(np.sign(shifts[flags]) == np.sign(betas[flags])) > 0.9
    assert np.abs(shifts[flags]).mean() > 3 * np.abs(shifts[~flags]).mean()


def test_spatial_effect_visible_as_neighbour_correlation():
    adata = simulate_isoform_data(
        n_genes=30, n_isoforms=2, grid_size=(20, 20), sv_fraction=0.5, theta=1.0, spatial_var=1.0,
        n_covariates=0, mean_depth=30.0, seed=6,
    )
    coords = adata.obsm["spatial"]
    right = {tuple(c): i for i, c in enumerate(coords)}
    pairs = np.array(
        [(i, right[(x + 1, y)]) for i, (x, y) in enumerate(coords) if (x + 1, y) in right]
    )
    corr = []
    for block in gene_blocks(adata):
        share = (block[:, 0] + 0.5) / (block.sum(1) + 1.0)
        corr.append(np.corrcoef(share[pairs[:, 0]], share[pairs[:, 1]])[0, 1])
    corr = np.asarray(corr)
    is_sv = np.asarray(adata.uns["simulation"]["genes"]["is_sv"])
    assert corr[is_sv].min() > corr[~is_sv].max()
    assert abs(corr[~is_sv].mean()) < 0.1


def test_spatial_covariate_pattern_splits_the_slide():
    adata = simulate_isoform_data(n_genes=2, grid_size=(10, 6), covariate_pattern="spatial", seed=0)
    x = adata.obsm["spatial"][:, 0]
    expected = (x > np.median(x)).astype(float)
    np.testing.assert_array_equal(adata.obs["covariate"].to_numpy(), expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"covariate": "ordinal"},
        {"covariate_pattern": "stripes"},
        {"du_fraction": 1.5},
        {"sv_fraction": -0.1},
        {"theta": 2.0},
        {"mean_depth": 0.0},
        {"n_genes": 0},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        simulate_isoform_data(**{"n_genes": 3, "grid_size": (4, 4), **kwargs})
