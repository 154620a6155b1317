"""splisosm.pl: the plots render, draw the right numbers, and fail with clear messages."""

from __future__ import annotations

import io
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from splisosm import SplisosmGLMM, pl  # noqa: E402
from splisosm.data.simulation import simulate_isoform_data  # noqa: E402

N_GENES = 6
EMPTY_SPOTS = 5  # spots on which the first gene gets no counts (NaN observed ratios)


def _simulate():
    adata = simulate_isoform_data(n_genes=N_GENES, n_isoforms=3, grid_size=(10, 10), du_fraction=0.5, seed=0)
    first = np.flatnonzero(adata.var["gene_symbol"].to_numpy() == "gene_0000")
    for matrix in (adata.X, adata.layers["counts"]):
        matrix[:EMPTY_SPOTS, first] = 0.0
    return adata


@pytest.fixture(scope="module")
def model() -> SplisosmGLMM:
    fitted = SplisosmGLMM(fitting_method="marginal_newton")
    fitted.setup_data(_simulate(), group_gene_by_n_iso=True, design_mtx="covariate")
    fitted.fit(batch_size=N_GENES, from_null=True, print_progress=False)
    fitted.test_differential_usage(method="marginal-score", print_progress=False)
    fitted.test_spatial_variability(method="score", print_progress=False)
    return fitted


@pytest.fixture(scope="module")
def unfitted() -> SplisosmGLMM:
    bare = SplisosmGLMM(fitting_method="marginal_newton")
    bare.setup_data(_simulate(), group_gene_by_n_iso=True, design_mtx="covariate")
    return bare


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _assert_not_blank(fig, min_fraction: float = 0.03) -> None:
    """Render ``fig`` to PNG and check that enough pixels differ from the background."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=60)
    buffer.seek(0)
    image = mpimg.imread(buffer, format="png")[..., :3]
    background = image[0, 0]
    differs = np.abs(image - background).max(axis=-1) > 0.05
    assert differs.mean() > min_fraction, f"only {differs.mean():.1%} of the pixels are drawn"


def _gene_counts(model: SplisosmGLMM, g: int) -> np.ndarray:
    columns = model.setup_record.genes.var_index[g]
    return np.asarray(model.filtered_adata.layers[model.setup_record.layer][:, columns], dtype=np.float64)


# ---------------------------------------------------------------------------------- isoform ratios
def test_isoform_ratios_renders_observed_and_fitted(model):
    gene = model.gene_names[1]
    fig = pl.isoform_ratios(model, gene)
    assert len(fig.axes) == 2 * 3 + 1  # two rows of three isoforms, and the colorbar
    _assert_not_blank(fig)

    g = model.gene_names.index(gene)
    counts = _gene_counts(model, g)
    observed = counts / counts.sum(axis=1, keepdims=True)
    fitted = model.get_fitted_ratios_anndata().layers["fitted_ratios"][:, model.setup_record.genes.var_index[g]]
    for col in range(3):
        obs_points = fig.axes[col].collections[-1]
        fit_points = fig.axes[3 + col].collections[-1]
        np.testing.assert_allclose(obs_points.get_array(), observed[:, col], rtol=1e-6)
        np.testing.assert_allclose(fit_points.get_array(), fitted[:, col], rtol=1e-5)
        assert obs_points.get_clim() == fit_points.get_clim() == (0.0, 1.0)
        np.testing.assert_allclose(obs_points.get_offsets(), model.filtered_adata.obsm["spatial"][:, :2])
    assert [ax.get_title() for ax in fig.axes[:3]] == list(model.filtered_adata.var_names[
        model.setup_record.genes.var_index[g]])


def test_isoform_ratios_draws_spots_without_counts_apart(model):
    fig = pl.isoform_ratios(model, "gene_0000")
    observed_panel, fitted_panel = fig.axes[0], fig.axes[3]
    empty, with_counts = observed_panel.collections
    no_counts = _gene_counts(model, 0).sum(axis=1) == 0
    assert no_counts[:EMPTY_SPOTS].all()
    np.testing.assert_array_equal(empty.get_offsets(), model.filtered_adata.obsm["spatial"][no_counts, :2])
    assert len(with_counts.get_array()) == model.n_spots - no_counts.sum()
    assert np.all(np.isfinite(with_counts.get_array()))
    assert len(fitted_panel.collections) == 1  # fitted ratios exist on every spot
    _assert_not_blank(fig)


def test_isoform_ratios_subset_of_isoforms(model):
    g = 2
    names = list(model.filtered_adata.var_names[model.setup_record.genes.var_index[g]])
    fig = pl.isoform_ratios(model, model.gene_names[g], isoforms=[names[2], names[0]], title="two")
    assert len(fig.axes) == 2 * 2 + 1
    assert [fig.axes[0].get_title(), fig.axes[1].get_title()] == [names[2], names[0]]
    with pytest.raises(ValueError, match="must name isoforms"):
        pl.isoform_ratios(model, model.gene_names[g], isoforms=["not_an_isoform"])


def test_isoform_ratios_errors(model, unfitted):
    with pytest.raises(KeyError, match="'no_such_gene' is not among"):
        pl.isoform_ratios(model, "no_such_gene")
    with pytest.raises(ValueError, match="not been fitted"):
        pl.isoform_ratios(unfitted, unfitted.gene_names[0])
    with pytest.raises(ValueError, match="setup_data"):
        pl.isoform_ratios(SplisosmGLMM(), "gene_0000")
    with pytest.raises(KeyError, match="obsm\\['nowhere'\\] is missing"):
        pl.isoform_ratios(model, model.gene_names[0], spatial_key="nowhere")


# ----------------------------------------------------------------------------------------- QQ plot
def _legend_texts(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_qq_sv_result(model):
    ax = pl.qq(model.sv_results)
    _assert_not_blank(ax.figure)
    texts = _legend_texts(ax)
    assert any(t.startswith(f"SV (score) (n={N_GENES})") for t in texts)
    points = ax.collections[-1].get_offsets()
    np.testing.assert_allclose(np.sort(points[:, 1]), np.sort(-np.log10(model.sv_results.pvalue)))
    np.testing.assert_allclose(points[:, 0], -np.log10(np.arange(1, N_GENES + 1) / (N_GENES + 1)))


def test_qq_du_result_one_series_per_covariate(model):
    ax = pl.qq(model.du_results)
    assert model.du_results.pvalue.ndim == 2
    texts = _legend_texts(ax)
    assert sum(t.startswith("covariate (n=") for t in texts) == 1
    _assert_not_blank(ax.figure)


def test_qq_two_dimensional_pvalues_with_nans():
    rng = np.random.default_rng(1)
    pvalues = rng.uniform(size=(200, 2))
    pvalues[:7, 1] = np.nan
    fig, ax = plt.subplots()
    out = pl.qq(pvalues, ax=ax, labels=["a", "b"])
    assert out is ax
    texts = _legend_texts(ax)
    assert "a (n=200)" in texts
    assert "b (n=193, 7 NaN dropped)" in texts
    scatters = [c for c in ax.collections if not isinstance(c, PolyCollection)]
    assert [len(c.get_offsets()) for c in scatters] == [200, 193]
    _assert_not_blank(fig)


def test_qq_series_and_frame():
    series = pd.Series([0.01, 0.2, np.nan, 0.7, 0.0], name="mine")
    ax = pl.qq(series)
    assert "mine (n=4, 1 NaN dropped)" in _legend_texts(ax)
    assert np.all(np.isfinite(ax.collections[-1].get_offsets()))  # p = 0 is clipped, not infinite
    frame = pd.DataFrame({"gene": list("abcd") * 2, "covariate": ["x"] * 4 + ["y"] * 4,
                          "pvalue": [0.1, 0.2, 0.3, np.nan, 0.5, 0.6, 0.7, 0.8]})
    texts = _legend_texts(pl.qq(frame, band=None))
    assert "x (n=3, 1 NaN dropped)" in texts and "y (n=4)" in texts


def test_qq_band_is_the_beta_order_statistic_interval():
    ax = pl.qq(np.array([0.3]), band=0.9)
    (poly,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    heights = poly.get_paths()[0].vertices[:, 1]
    # one uniform p-value: Beta(1, 1), so the band runs from the 95% to the 5% quantile
    np.testing.assert_allclose([heights.min(), heights.max()], -np.log10([0.95, 0.05]), rtol=1e-6)


def test_qq_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pl.qq(np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="every p-value is NaN"):
        pl.qq(np.array([np.nan, np.nan]))
    with pytest.raises(ValueError, match="band"):
        pl.qq(np.array([0.5]), band=1.0)
    with pytest.raises(ValueError, match="labels"):
        pl.qq(np.ones((3, 2)) * 0.5, labels=["only one"])


# ----------------------------------------------------------------------------------------- volcano
def _manual_effect(model: SplisosmGLMM, g: int) -> float:
    x = model.design_mtx[:, 0].cpu().numpy()
    high = x > np.median(x)
    counts = _gene_counts(model, g)
    up, down = counts[high].sum(axis=0), counts[~high].sum(axis=0)
    delta = up / up.sum() - down / down.sum()
    return float(delta[np.argmax(np.abs(delta))])


def test_volcano_positions_colours_and_labels(model):
    ax = pl.volcano(model, label_top=3)
    _assert_not_blank(ax.figure)
    result = model.du_results
    significant = result.pvalue_adj[:, 0] < 0.05
    grey, red = ax.collections[:2]
    assert len(red.get_offsets()) == significant.sum()
    assert len(grey.get_offsets()) == (~significant).sum()

    points = np.vstack([grey.get_offsets(), red.get_offsets()])
    genes = np.concatenate([np.flatnonzero(~significant), np.flatnonzero(significant)])
    expected_x = [_manual_effect(model, g) for g in genes]
    np.testing.assert_allclose(points[:, 0], expected_x, rtol=1e-6)
    np.testing.assert_allclose(points[:, 1], -np.log10(result.pvalue[genes, 0]), rtol=1e-6)

    labelled = [text.get_text() for text in ax.texts]
    assert labelled == [str(result.genes[g]) for g in np.argsort(result.pvalue[:, 0], kind="stable")[:3]]


def test_volcano_statistic_axis_and_named_covariate(model):
    fig, ax = plt.subplots()
    out = pl.volcano(model, covariate="covariate", ax=ax, y="statistic", label_top=0)
    assert out is ax and not ax.texts
    heights = np.sort(np.concatenate([c.get_offsets()[:, 1] for c in ax.collections[:2]]))
    np.testing.assert_allclose(heights, np.sort(model.du_results.statistic[:, 0]), rtol=1e-5)
    _assert_not_blank(fig)


def test_volcano_errors(model, unfitted):
    with pytest.raises(KeyError, match="'nope' was not tested"):
        pl.volcano(model, covariate="nope")
    with pytest.raises(ValueError, match="out of range"):
        pl.volcano(model, covariate=3)
    with pytest.raises(ValueError, match="test_differential_usage"):
        pl.volcano(unfitted)
    with pytest.raises(ValueError, match="setup_data"):
        pl.volcano(SplisosmGLMM())


def test_median_split_of_covariates():
    from splisosm.pl import _high_low_split

    np.testing.assert_array_equal(_high_low_split(np.array([0.0, 1.0, 1.0, 0.0])), [False, True, True, False])
    # mostly ones: the median is 1, so "high" are the spots at 1
    np.testing.assert_array_equal(_high_low_split(np.array([1.0, 1.0, 1.0, 0.0])), [True, True, True, False])
    np.testing.assert_array_equal(_high_low_split(np.array([-2.0, 0.5, 3.0, 0.1, 7.0])),
                                  [False, False, True, False, True])  # the median itself goes low
    with pytest.raises(ValueError, match="constant"):
        _high_low_split(np.ones(4))


# ----------------------------------------------------------------------------------- optional import
def test_import_splisosm_does_not_load_matplotlib():
    code = ("import sys; import splisosm, splisosm.pl; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'splisosm\[plot\]'"):
        pl.qq(np.array([0.5, 0.1]))
