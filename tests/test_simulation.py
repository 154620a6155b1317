"""Simulated isoform data: layout, reproducibility, stored truth and visible effects."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from splisosm.simulation import simulate_isoform_data


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
    assert list(adata.var.columns) == ["gene_symbol", "transcript_id"]
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
    truth = adata.uns["simulation"]["genes"]
    assert [len(b) for b in truth["intercept"]] == [1, 3, 2, 1]
    assert [np.shape(b) for b in truth["beta"]] == [(3, 1), (3, 3), (3, 2), (3, 1)]
    with pytest.raises(ValueError):
        simulate_isoform_data(n_genes=2, n_isoforms=[3, 1])


def test_seed_reproducibility():
    first = simulate_isoform_data(n_genes=5, grid_size=(6, 6), du_fraction=0.4, seed=7)
    again = simulate_isoform_data(n_genes=5, grid_size=(6, 6), du_fraction=0.4, seed=7)
    other = simulate_isoform_data(n_genes=5, grid_size=(6, 6), du_fraction=0.4, seed=8)
    np.testing.assert_array_equal(first.layers["counts"], again.layers["counts"])
    np.testing.assert_array_equal(first.obs.to_numpy(), again.obs.to_numpy())
    assert first.uns["simulation"] == again.uns["simulation"]
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
    assert truth["covariate_names"] == ["covariate_1", "covariate_2"]
    genes = truth["genes"]
    assert sum(genes["is_du"]) == 5 and sum(genes["is_sv"]) == 10
    per_gene = zip(genes["is_du"], genes["is_sv"], genes["beta"], genes["theta"])
    for is_du, is_sv, beta, theta in per_gene:
        assert np.all(np.abs(beta) == (1.0 if is_du else 0.0))
        assert theta == (0.7 if is_sv else 0.0)


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
    shifts, betas, flags = [], [], []
    for block, beta, is_du in zip(gene_blocks(adata), genes["beta"], genes["is_du"]):
        # pooled log-ratio of each non-reference isoform to the reference, group 1 minus group 0
        pooled = [
            np.log((block[g, :-1].sum(0) + 0.5) / (block[g, -1].sum() + 0.5))
            for g in (group, ~group)
        ]
        shifts.extend(pooled[0] - pooled[1])
        betas.extend(beta[0])
        flags.extend([is_du] * len(beta[0]))
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
