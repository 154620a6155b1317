"""Plots of a fitted :class:`~splisosm.SplisosmGLMM` and of its test results (matplotlib).

matplotlib is an optional dependency (``pip install 'splisosm[plot]'``). It is imported only when
a plot is drawn, so ``import splisosm`` and ``import splisosm.pl`` work without it.

* :func:`isoform_ratios`: observed and fitted isoform ratios of one gene on the slide;
* :func:`qq`: QQ plot of p-values against the uniform distribution, with a confidence band;
* :func:`volcano`: differential-usage significance against the direction of the usage change.

Example
-------
>>> from splisosm import pl
>>> fig = pl.isoform_ratios(model, "gene_0003")
>>> ax = pl.qq(model.sv_results)
>>> ax = pl.volcano(model, covariate="covariate")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from splisosm.hyptest_glmm import SplisosmGLMM

__all__ = ["isoform_ratios", "qq", "volcano"]

_INSTALL_HINT = "pip install 'splisosm[plot]'"


def pyplot():
    """matplotlib.pyplot, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            f"splisosm.pl needs matplotlib, which is not installed; install it with `{_INSTALL_HINT}` "
            "(or `pip install matplotlib`)"
        ) from err
    return plt


# ---------------------------------------------------------------------------------------- helpers
def _require_setup(model: SplisosmGLMM) -> None:
    if getattr(model, "setup_record", None) is None:
        raise ValueError("The model has no data: call setup_data() (and fit()) before plotting")


def _require_fit(model: SplisosmGLMM) -> None:
    _require_setup(model)
    if model.fit_record is None:
        raise ValueError("The model has not been fitted: call fit() before plotting fitted ratios")


def _gene_position(model: SplisosmGLMM, gene: str) -> int:
    """Position of ``gene`` among the model's genes (the first of duplicated names)."""
    names = model.gene_names
    try:
        return names.index(gene)
    except ValueError:
        shown = ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")
        raise KeyError(f"Gene {gene!r} is not among the model's {len(names)} genes ({shown})") from None


def _dense_columns(matrix: Any, columns: np.ndarray) -> np.ndarray:
    """``matrix[:, columns]`` as a dense float64 array (dense or scipy sparse input)."""
    block = matrix[:, columns]
    if hasattr(block, "toarray"):
        block = block.toarray()
    return np.asarray(block, dtype=np.float64)


def _gene_counts(model: SplisosmGLMM, g: int) -> np.ndarray:
    """``(n_spots, m)`` observed counts of gene position ``g`` from the set-up counts layer."""
    record = model.setup_record
    adata = model.filtered_adata
    return _dense_columns(adata.layers[record.layer], np.asarray(record.genes.var_index[g]))


def _observed_ratios(counts: np.ndarray) -> np.ndarray:
    """Per-spot isoform ratios: counts over the gene total; NaN on spots without counts."""
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), np.nan)


def _coordinates(model: SplisosmGLMM, spatial_key: str) -> np.ndarray:
    obsm = model.filtered_adata.obsm
    if spatial_key not in obsm:
        raise KeyError(
            f"No spot coordinates: obsm[{spatial_key!r}] is missing from the model's filtered AnnData "
            f"(obsm keys: {list(obsm.keys())}); pass spatial_key=..."
        )
    coords = np.asarray(obsm[spatial_key], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(f"obsm[{spatial_key!r}] must be (n_spots, >= 2) coordinates, got shape {coords.shape}")
    return coords[:, :2]


# ---------------------------------------------------------------------------------- isoform ratios
def isoform_ratios(
    model: SplisosmGLMM,
    gene: str,
    *,
    spatial_key: str = "spatial",
    isoforms: Sequence[str] | None = None,
    cmap: str = "viridis",
    na_color: str = "lightgrey",
    point_size: float | None = None,
    panel_size: float = 3.0,
    title: str | None = None,
) -> Figure:
    """Observed and fitted isoform ratios of one gene, drawn on the spot coordinates.

    The figure has one column per isoform and two rows: the top row shows the observed ratio of
    each spot (the isoform's count over the gene's total count on that spot), the bottom row the
    ratio fitted by the model. All panels share the colour scale ``[0, 1]`` and one colorbar.
    Spots where the gene has no counts have no observed ratio and are drawn in ``na_color``.

    Parameters
    ----------
    model
        A :class:`~splisosm.SplisosmGLMM` after :meth:`~splisosm.SplisosmGLMM.fit`.
    gene
        Display name of the gene (one of ``model.gene_names``; the first gene of that name if
        names repeat).
    spatial_key
        Key of the spot coordinates in ``model.filtered_adata.obsm``; the first two columns are
        used as x and y.
    isoforms
        Names (``var_names`` of the filtered AnnData) of the isoforms to show, in this order; by
        default all isoforms of the gene, reference last.
    cmap
        Colormap of the ratios.
    na_color
        Colour of spots without an observed ratio.
    point_size
        Marker area of a spot (points^2); by default chosen from the number of spots.
    panel_size
        Width and height of one panel in inches.
    title
        Figure title; defaults to the gene name.

    Returns
    -------
    matplotlib.figure.Figure
        The figure; ``fig.axes`` holds the panels row by row (observed first), then the colorbar.

    Raises
    ------
    ValueError
        If the model has no data or has not been fitted, or an isoform is not one of the gene's.
    KeyError
        If ``gene`` is unknown or ``obsm[spatial_key]`` is missing.
    ImportError
        If matplotlib is not installed.
    """
    _require_fit(model)
    g = _gene_position(model, gene)
    coords = _coordinates(model, spatial_key)
    plt = pyplot()
    from matplotlib.colors import Normalize

    columns = np.asarray(model.setup_record.genes.var_index[g])
    names = [str(v) for v in model.filtered_adata.var_names[columns]]
    if isoforms is None:
        chosen = list(range(len(names)))
    else:
        unknown = [iso for iso in isoforms if iso not in names]
        if unknown or len(isoforms) == 0:
            raise ValueError(f"`isoforms` must name isoforms of gene {gene!r} ({names}); unknown: {unknown}")
        chosen = [names.index(iso) for iso in isoforms]

    import torch  # always installed with splisosm

    observed = _observed_ratios(_gene_counts(model, g))
    with torch.no_grad():  # rebuilds this gene's model only, not every gene's
        fitted = model.get_gene_model(gene).get_isoform_ratio()
    fitted = np.asarray(fitted.detach().cpu().numpy(), dtype=np.float64).reshape(coords.shape[0], len(names))

    n_col = len(chosen)
    size = point_size if point_size is not None else float(np.clip(4000.0 / max(coords.shape[0], 1), 1.0, 60.0))
    fig, axes = plt.subplots(
        2, n_col, figsize=(panel_size * n_col + 1.0, panel_size * 2), squeeze=False, constrained_layout=True
    )
    norm = Normalize(vmin=0.0, vmax=1.0)
    mappable = None
    for row, (label, values) in enumerate((("observed", observed), ("fitted", fitted))):
        for col, iso in enumerate(chosen):
            ax = axes[row, col]
            ratio = values[:, iso]
            missing = ~np.isfinite(ratio)
            if missing.any():
                ax.scatter(coords[missing, 0], coords[missing, 1], s=size, c=na_color, linewidths=0)
            mappable = ax.scatter(
                coords[~missing, 0], coords[~missing, 1], s=size, c=ratio[~missing], cmap=cmap, norm=norm,
                linewidths=0,
            )
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(names[iso], fontsize="medium")
            if col == 0:
                ax.set_ylabel(label)
    fig.colorbar(mappable, ax=axes.ravel().tolist(), label="isoform ratio", shrink=0.8)
    fig.suptitle(gene if title is None else title)
    return fig


# ----------------------------------------------------------------------------------------- QQ plot
def _pvalue_series(
    pvalues_or_result: Any, labels: Sequence[str] | str | None
) -> list[tuple[str, np.ndarray]]:
    """The p-value series to plot as ``(label, values)`` pairs, NaNs still included."""
    import pandas as pd

    from splisosm.results import DUResult, SVResult

    obj = pvalues_or_result
    if isinstance(obj, DUResult):
        values, default = np.asarray(obj.pvalue, dtype=np.float64), [str(c) for c in obj.covariates]
    elif isinstance(obj, SVResult):
        values, default = np.asarray(obj.pvalue, dtype=np.float64), [f"SV ({obj.method})"]
    elif isinstance(obj, pd.DataFrame) and "pvalue" in obj.columns:  # a result's to_frame()
        if "covariate" in obj.columns:
            groups = list(obj.groupby("covariate", sort=False)["pvalue"])
            series = [(str(name), group.to_numpy(dtype=np.float64)) for name, group in groups]
        else:
            series = [("p-values", obj["pvalue"].to_numpy(dtype=np.float64))]
        return _check_series(series, labels)
    elif isinstance(obj, pd.DataFrame):
        values, default = obj.to_numpy(dtype=np.float64), [str(c) for c in obj.columns]
    elif isinstance(obj, pd.Series):
        values, default = obj.to_numpy(dtype=np.float64), ["p-values" if obj.name is None else str(obj.name)]
    else:
        values = np.asarray(obj, dtype=np.float64)
        default = [f"column {i}" for i in range(values.shape[1])] if values.ndim == 2 else ["p-values"]
    values = values.reshape(1) if values.ndim == 0 else values
    values = values[:, None] if values.ndim == 1 else values
    if values.ndim != 2:
        raise ValueError(f"p-values must be 1-D or 2-D (genes x series), got shape {values.shape}")
    return _check_series([(default[i], values[:, i]) for i in range(values.shape[1])], labels)


def _check_series(
    series: list[tuple[str, np.ndarray]], labels: Sequence[str] | str | None
) -> list[tuple[str, np.ndarray]]:
    """``series`` relabelled by ``labels`` (if given), after checking the values are p-values."""
    if labels is not None:
        names = [labels] if isinstance(labels, str) else [str(v) for v in labels]
        if len(names) != len(series):
            raise ValueError(f"`labels` has {len(names)} entries for {len(series)} p-value series")
        series = [(name, p) for name, (_, p) in zip(names, series)]
    for _, p in series:
        p = p[~np.isnan(p)]
        if p.size and (p.min() < 0.0 or p.max() > 1.0):
            raise ValueError("p-values must lie in [0, 1]")
    return series


def qq(
    pvalues_or_result: Any,
    *,
    ax: Axes | None = None,
    band: float | None = 0.95,
    labels: Sequence[str] | str | None = None,
    title: str | None = None,
    point_size: float = 12.0,
    band_color: str = "lightgrey",
) -> Axes:
    """QQ plot of ``-log10`` p-values against the uniform distribution.

    Sorted p-values ``p_(1) <= ... <= p_(n)`` are drawn at the expected uniform quantiles
    ``i / (n + 1)``, both on the ``-log10`` scale, with the identity line. Under the null the
    ``i``-th smallest of ``n`` uniform p-values follows ``Beta(i, n - i + 1)``; the shaded band
    spans, point by point, the central ``band`` probability of these distributions. Points above
    the band mean p-values smaller than uniform ones (signal or an anti-conservative test),
    points below it a conservative test.

    Parameters
    ----------
    pvalues_or_result
        The p-values, as one of

        * a 1-D or 2-D array-like (2-D: one series per column) or a pandas Series;
        * a result object, :attr:`SplisosmGLMM.sv_results <splisosm.SplisosmGLMM.sv_results>` or
          :attr:`SplisosmGLMM.du_results <splisosm.SplisosmGLMM.du_results>` (whose
          ``(n_genes, n_covariates)`` p-values give one series per covariate);
        * a data frame from a result's ``to_frame()`` (column ``pvalue``, one series per value of
          ``covariate`` if present); any other data frame gives one series per column.

        NaN p-values (genes whose test did not run) are dropped; the legend says how many.
        p-values of 0 are drawn at ``-log10`` of the smallest positive float64.
    ax
        Axes to draw on; a new figure when None.
    band
        Probability of the pointwise confidence band (in ``(0, 1)``), or None for no band. With
        several series of different lengths the band of the longest is drawn.
    labels
        Legend label per series; by default the covariate names of a DU result, ``'SV (method)'``
        for an SV result, the Series name or ``'p-values'``.
    title
        Axes title.
    point_size
        Marker area of the points.
    band_color
        Colour of the band.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on (``ax.figure`` is the figure).

    Raises
    ------
    ValueError
        If p-values fall outside ``[0, 1]``, all are NaN, ``band`` is outside ``(0, 1)`` or
        ``labels`` does not match the number of series.
    ImportError
        If matplotlib is not installed.
    """
    if band is not None and not 0.0 < band < 1.0:
        raise ValueError(f"`band` must lie in (0, 1) or be None, got {band!r}")
    series = _pvalue_series(pvalues_or_result, labels)
    kept = [(label, p[~np.isnan(p)], int(np.isnan(p).sum())) for label, p in series]
    if all(p.size == 0 for _, p, _ in kept):
        raise ValueError("No p-values to plot: every p-value is NaN")
    plt = pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)

    tiny = np.finfo(np.float64).tiny
    n_max = max(p.size for _, p, _ in kept)
    if band is not None and n_max > 0:
        from scipy.stats import beta

        i = np.arange(1, n_max + 1)
        expected = -np.log10(i / (n_max + 1.0))
        lower = beta.ppf((1.0 - band) / 2.0, i, n_max - i + 1)
        upper = beta.ppf((1.0 + band) / 2.0, i, n_max - i + 1)
        ax.fill_between(
            expected, -np.log10(np.maximum(upper, tiny)), -np.log10(np.maximum(lower, tiny)),
            color=band_color, alpha=0.6, linewidth=0, label=f"{band:.0%} band (n={n_max})",
        )
    for label, p, n_nan in kept:
        if p.size == 0:
            continue
        n = p.size
        expected = -np.log10(np.arange(1, n + 1) / (n + 1.0))
        observed = -np.log10(np.maximum(np.sort(p), tiny))
        legend = f"{label} (n={n}" + (f", {n_nan} NaN dropped)" if n_nan else ")")
        ax.scatter(expected, observed, s=point_size, label=legend, zorder=3)
    ax.axline((0.0, 0.0), slope=1.0, color="black", linewidth=0.8, linestyle="--", zorder=2)
    ax.set_xlabel(r"expected $-\log_{10}(p)$")
    ax.set_ylabel(r"observed $-\log_{10}(p)$")
    ax.set_xlim(left=0.0)
    ax.set_ylim(bottom=0.0)
    ax.legend(loc="upper left", fontsize="small", frameon=False)
    if title is not None:
        ax.set_title(title)
    return ax


# ----------------------------------------------------------------------------------------- volcano
def _covariate_position(model: SplisosmGLMM, covariate: str | int | None) -> int:
    names = list(model.du_results.covariates)
    if covariate is None:
        return 0
    if isinstance(covariate, (int, np.integer)) and not isinstance(covariate, bool):
        if not 0 <= covariate < len(names):
            raise ValueError(f"covariate index {covariate} out of range for {len(names)} covariates {names}")
        return int(covariate)
    if covariate not in names:
        raise KeyError(f"Covariate {covariate!r} was not tested; the tested covariates are {names}")
    return names.index(covariate)


def _high_low_split(x: np.ndarray) -> np.ndarray:
    """Spots with the covariate above its median (True) or not; ties at the median go low.

    When nothing lies strictly above the median (e.g. a binary covariate that is 1 on most
    spots), spots at or above it are taken instead.
    """
    median = np.median(x)
    high = x > median
    if not high.any():
        high = x >= median
    if high.all():
        raise ValueError("The covariate is constant over the spots: it has no high and low spots to compare")
    return high


def _effect_direction(model: SplisosmGLMM, c: int) -> pd.DataFrame:
    """Per gene, the signed change in isoform usage between high and low covariate spots.

    See :func:`volcano` for the definition. Columns: ``gene``, ``isoform`` (the isoform whose
    pooled ratio changes most) and ``delta_ratio`` (NaN where either group has no counts).
    """
    import pandas as pd

    design = model.design_mtx
    x = np.asarray(design.detach().cpu().numpy() if hasattr(design, "detach") else design, dtype=np.float64)[:, c]
    high = _high_low_split(x)
    record = model.setup_record
    var_names = model.filtered_adata.var_names
    rows = []
    for g, gene in enumerate(model.gene_names):
        counts = _gene_counts(model, g)
        pooled_high, pooled_low = counts[high].sum(axis=0), counts[~high].sum(axis=0)
        if pooled_high.sum() <= 0 or pooled_low.sum() <= 0:
            rows.append((gene, None, np.nan))
            continue
        delta = pooled_high / pooled_high.sum() - pooled_low / pooled_low.sum()
        k = int(np.argmax(np.abs(delta)))
        rows.append((gene, str(var_names[np.asarray(record.genes.var_index[g])[k]]), float(delta[k])))
    return pd.DataFrame(rows, columns=["gene", "isoform", "delta_ratio"])


def volcano(
    model: SplisosmGLMM,
    *,
    covariate: str | int | None = None,
    ax: Axes | None = None,
    label_top: int = 5,
    y: Literal["pvalue", "statistic"] = "pvalue",
    alpha: float = 0.05,
    point_size: float = 14.0,
    colors: tuple[str, str] = ("grey", "tab:red"),
    title: str | None = None,
) -> Axes:
    """Volcano plot of the differential-usage test for one covariate.

    One point per gene: the direction and size of the usage change on the x axis, the evidence
    for it on the y axis (``-log10`` p-value, or the test statistic with ``y='statistic'``).
    Genes whose Benjamini–Hochberg adjusted p-value is below ``alpha`` are coloured, and the
    ``label_top`` genes with the smallest p-values are labelled.

    The x axis, ``delta ratio``, is computed from the observed counts, not the model: the spots
    are split at the covariate's median into *high* (above the median) and *low* (the rest; for a
    0/1 covariate, the 1 and 0 spots). For each gene the counts of each group are summed over its
    spots and turned into isoform ratios; among the gene's isoforms, the one whose pooled ratio
    differs most between the groups is taken, and ``delta ratio = ratio(high) - ratio(low)`` of
    that isoform, in ``[-1, 1]``. Positive values mean that this isoform is used more on high
    spots. A gene with no counts in one group gets NaN and is not drawn. Because the isoform is
    picked per gene, the sign says which way *that* isoform moves, not a gene-level direction.

    Parameters
    ----------
    model
        A :class:`~splisosm.SplisosmGLMM` after
        :meth:`~splisosm.SplisosmGLMM.test_differential_usage`.
    covariate
        Name or position of the tested covariate; the first when None.
    ax
        Axes to draw on; a new figure when None.
    label_top
        Number of genes to label (those with the smallest p-values, or largest statistics with
        ``y='statistic'``); 0 for none.
    y
        ``'pvalue'`` for ``-log10`` p-values (p-values of 0 at ``-log10`` of the smallest
        positive float64), ``'statistic'`` for the test statistic.
    alpha
        Level of the adjusted p-values for colouring.
    point_size
        Marker area of the points.
    colors
        Colours of the non-significant and the significant genes.
    title
        Axes title; defaults to the covariate name and test method.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on (``ax.figure`` is the figure).

    Raises
    ------
    ValueError
        If the model has no data, has not been tested for differential usage, has no design
        matrix, the covariate is constant or the covariate index is out of range.
    KeyError
        If a named covariate was not tested.
    ImportError
        If matplotlib is not installed.
    """
    _require_setup(model)
    result = model.du_results
    if result is None:
        raise ValueError("No differential-usage results: call test_differential_usage() before volcano()")
    if model.design_mtx is None:
        raise ValueError("The model has no design matrix: set up the data with design_mtx=... to test DU")
    if y not in ("pvalue", "statistic"):
        raise ValueError(f"`y` must be 'pvalue' or 'statistic', got {y!r}")
    if label_top < 0:
        raise ValueError(f"`label_top` must be >= 0, got {label_top}")
    c = _covariate_position(model, covariate)
    effect = _effect_direction(model, c)
    plt = pyplot()

    pvalue = np.asarray(result.pvalue, dtype=np.float64)[:, c]
    if y == "pvalue":
        height = -np.log10(np.maximum(pvalue, np.finfo(np.float64).tiny))
        ylabel = r"$-\log_{10}(p)$"
    else:
        height = np.asarray(result.statistic, dtype=np.float64)[:, c]
        ylabel = "DU statistic"
    x = effect["delta_ratio"].to_numpy(dtype=np.float64)
    significant = np.asarray(result.pvalue_adj, dtype=np.float64)[:, c] < alpha
    shown = np.isfinite(x) & np.isfinite(height)

    if ax is None:
        _, ax = plt.subplots(figsize=(5.0, 4.5), constrained_layout=True)
    for flag, color, label in ((False, colors[0], "not significant"), (True, colors[1], f"BH adj. p < {alpha:g}")):
        pick = shown & (significant == flag)
        ax.scatter(x[pick], height[pick], s=point_size, c=color, label=f"{label} ({int(pick.sum())})",
                   linewidths=0, alpha=0.85)
    ax.axvline(0.0, color="black", linewidth=0.6, linestyle=":")
    if label_top:
        candidates = np.flatnonzero(shown)
        order = candidates[np.argsort(-height[candidates], kind="stable")][:label_top]
        for g in order:  # text on the side facing the centre, so that it stays inside the axes
            right = x[g] >= 0
            ax.annotate(str(result.genes[g]), (x[g], height[g]), xytext=(-3 if right else 3, 3),
                        textcoords="offset points", ha="right" if right else "left", fontsize="x-small")
    n_hidden = int((~shown).sum())
    xlabel = "delta ratio (high - low covariate spots)"
    ax.set_xlabel(xlabel if not n_hidden else f"{xlabel}; {n_hidden} gene(s) not drawn")
    ax.set_ylabel(ylabel)
    half_width = max(0.05, 1.1 * float(np.abs(x[shown]).max())) if shown.any() else 1.05
    ax.set_xlim(-half_width, half_width)  # symmetric, so that left and right compare at a glance
    ax.legend(loc="upper left", fontsize="small", frameon=False)
    ax.set_title(title if title is not None else f"DU: {result.covariates[c]} ({result.method})")
    return ax
