"""Input validation, spot/isoform filtering and per-gene count tensors for ``SplisosmGLMM``.

Everything ``setup_data`` does before the design matrix and the spatial kernel: argument
validation, connected-component filtering of spots, isoform filtering, grouping isoforms into
genes, the filtered AnnData and the per-gene count tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components

from splisosm._checks import check_int, check_real
from splisosm.data._design import subset_rows

#: Fewest spots a data set may have: below this no variance component (spatial or not) can be
#: told apart from noise, yet a fit would still produce confident-looking p-values.
MIN_SPOTS = 10


@dataclass
class GeneTable:
    """The genes retained by filtering, in gene order (first appearance in ``var``).

    Attributes
    ----------
    counts
        One float32 ``(n_spots, m_g)`` tensor per gene, isoforms in var order (reference last).
    names
        Display names (not necessarily unique).
    keys
        Values of the ``group_iso_by`` column identifying each gene.
    n_isos
        Isoforms per gene.
    var_index
        Positions (into the filtered AnnData's columns) of each gene's isoforms.
    """

    counts: list[torch.Tensor]
    names: list[str]
    keys: list[Any]
    n_isos: list[int]
    var_index: list[np.ndarray] = field(default_factory=list)


def check_adata_inputs(
    adata: Any,
    *,
    layer: str,
    group_iso_by: str,
    min_counts: float,
    min_bin_pct: float,
    gene_names: Any,
    min_component_size: Any,
    design_mtx: Any,
    spatial_key: str,
    adj_key: str | None,
) -> None:
    """Validate ``setup_data`` arguments, plus the counts themselves.

    The checks run in the order splisosm 1.2.0 makes them (``adata``, ``layer``, ``group_iso_by``,
    ``min_counts``, ``min_bin_pct``, ``gene_names``, ``min_component_size``, the rows of
    ``design_mtx``, then the spatial inputs), so the first problem reported is the same.

    Raises
    ------
    ValueError
        With a message naming the offending argument and what was expected.
    """
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise ValueError(f"`adata` must be an AnnData object, got {type(adata).__name__}")
    if layer not in adata.layers:
        raise ValueError(
            f"`layer`={layer!r} not found in adata.layers (available: {list(adata.layers.keys())})"
        )
    if group_iso_by not in adata.var.columns:
        raise ValueError(
            f"`group_iso_by`={group_iso_by!r} is not a column of adata.var "
            f"(available: {list(adata.var.columns)})"
        )
    if adata.var[group_iso_by].isna().all():
        raise ValueError(
            f"Every value of adata.var[{group_iso_by!r}] (`group_iso_by`) is missing (NaN), so no "
            "isoform belongs to a gene"
        )
    check_real("min_counts", min_counts, low=0.0)
    check_real("min_bin_pct", min_bin_pct, low=0.0, high=100.0)
    check_enough_spots(adata.n_obs, "`adata`")
    if isinstance(gene_names, (list, tuple, np.ndarray, pd.Series)):
        raise ValueError("`gene_names` must be the name of an adata.var column or None, not a list")
    check_int("min_component_size", min_component_size, minimum=1)
    shape = getattr(design_mtx, "shape", None)
    if shape is not None and len(shape) > 0 and shape[0] != adata.n_obs:
        raise ValueError(
            f"`design_mtx` has {shape[0]} rows but adata has {adata.n_obs} spots (n_obs)"
        )
    has_coords = spatial_key in adata.obsm
    has_adj = adj_key is not None and adj_key in adata.obsp
    if not has_coords and not has_adj:
        raise ValueError(
            f"No spatial information: `spatial_key`={spatial_key!r} not in adata.obsm"
            + (f" and `adj_key`={adj_key!r} not in adata.obsp" if adj_key is not None else "")
        )
    if adj_key is not None and not has_adj:
        raise ValueError(f"`adj_key`={adj_key!r} not found in adata.obsp")
    _check_counts(adata.layers[layer], layer)


def check_enough_spots(n_spots: int, what: str) -> None:
    """Refuse data sets with fewer than :data:`MIN_SPOTS` spots."""
    if n_spots < MIN_SPOTS:
        raise ValueError(
            f"{what} has {n_spots} spot(s); splisosm needs at least {MIN_SPOTS} spots to estimate "
            "isoform-usage variance"
        )


def _check_counts(counts: Any, layer: str) -> None:
    if getattr(counts, "ndim", 2) != 2:
        raise ValueError(f"adata.layers[{layer!r}] must be 2-D (spots x isoforms), got {counts.ndim}-D")
    values = counts.data if sp.issparse(counts) else np.asarray(counts)
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"adata.layers[{layer!r}] must hold real numbers, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        raise ValueError(f"adata.layers[{layer!r}] contains NaN or infinite counts")
    if (values < 0).any():
        raise ValueError(f"adata.layers[{layer!r}] contains negative counts")
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
        raise ValueError(f"adata.layers[{layer!r}] contains non-integer counts; raw counts are required")


def read_coordinates(adata: Any, spatial_key: str) -> np.ndarray | None:
    """Float32 ``(n, d)`` coordinates from ``adata.obsm[spatial_key]``, or None if absent.

    Warns
    -----
    UserWarning
        If several spots share the same coordinates.
    """
    if spatial_key not in adata.obsm:
        return None
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float32)
    if coords.ndim != 2:
        raise ValueError(
            f"adata.obsm[{spatial_key!r}] must be a 2-D (n_spots, n_dims) array, got shape {coords.shape}"
        )
    if not np.isfinite(coords).all():
        raise ValueError(f"adata.obsm[{spatial_key!r}] contains NaN or infinite coordinates")
    n_unique = np.unique(coords, axis=0).shape[0]
    if n_unique < coords.shape[0]:
        warnings.warn(
            f"{coords.shape[0] - n_unique} spots share coordinates with another spot; "
            "the k-NN graph around them is ill-defined (consider merging or jittering them).",
            UserWarning,
            stacklevel=3,
        )
    return coords


def symmetrised_adjacency(adjacency: Any, adj_key: str) -> sp.csc_matrix:
    """CSC copy of a supplied adjacency, averaged with its transpose when not symmetric.

    Raises
    ------
    ValueError
        If the graph has no edge between two different spots: its spatial kernel would be the
        identity, the white-noise model itself, and a spatial test would compare a model with
        itself.
    """
    adj = sp.csc_matrix(adjacency, dtype=np.float64)
    off_diagonal = adj - sp.diags(adj.diagonal())
    if not (off_diagonal != 0).nnz:
        raise ValueError(
            f"adata.obsp[{adj_key!r}] (`adj_key`) has no edge between two different spots, so "
            "there is no spatial structure to model"
        )
    if (adj != adj.T).nnz > 0:
        warnings.warn(
            "The supplied adjacency matrix is not symmetric; it was symmetrised as (A + A^T) / 2.",
            RuntimeWarning,
            stacklevel=3,
        )
        adj = sp.csc_matrix((adj + adj.T) / 2)
    return adj


def component_filter(
    adata: Any,
    adjacency: sp.spmatrix,
    design_mtx: Any,
    min_component_size: int,
) -> tuple[Any, sp.spmatrix, Any, np.ndarray]:
    """Drop spots in connected components smaller than ``min_component_size``.

    A ``UserWarning`` reports how many spots were removed and how many remain.

    Returns
    -------
    adata, adjacency, design_mtx, keep
        Unchanged when nothing is removed; otherwise a subset copy, the restricted adjacency
        and the row-subset array design. ``keep`` is the boolean mask of retained spots.
    """
    _, labels = connected_components(adjacency, directed=False)
    sizes = np.bincount(labels)
    keep = sizes[labels] >= min_component_size
    n_removed = int((~keep).sum())
    if n_removed == 0:
        return adata, adjacency, design_mtx, keep
    if not keep.any():
        raise ValueError(
            f"All {adata.n_obs} spots lie in connected components smaller than "
            f"`min_component_size`={min_component_size}"
        )
    check_enough_spots(int(keep.sum()), f"After `min_component_size`={min_component_size}, the data")
    warnings.warn(
        f"Removed {n_removed} spots in connected components with fewer than "
        f"{min_component_size} spots; {int(keep.sum())} spots remain.",
        UserWarning,
        stacklevel=3,
    )
    idx = np.flatnonzero(keep)
    adjacency = sp.csc_matrix(adjacency)[idx][:, idx]
    return adata[keep].copy(), adjacency, subset_rows(design_mtx, keep), keep


def warn_if_disconnected(adjacency: sp.spmatrix) -> None:
    """Warn when the spot graph has several connected components (kernel is block-diagonal)."""
    n_comp, labels = connected_components(adjacency, directed=False)
    if n_comp > 1:
        smallest = int(np.bincount(labels).min())
        warnings.warn(
            f"The spatial neighbour graph has {n_comp} disconnected components (smallest: "
            f"{smallest} spots); spatial effects are not shared across them. Consider "
            "`min_component_size` in setup_data() to drop small islands.",
            UserWarning,
            stacklevel=3,
        )


def select_isoforms(
    adata: Any,
    *,
    layer: str,
    group_iso_by: str,
    min_counts: float,
    min_bin_pct: float,
) -> tuple[np.ndarray, list[Any], list[np.ndarray]]:
    """Keep isoforms that pass the count filters and group them into genes.

    An isoform is kept when its total count is at least ``min_counts``, the fraction of spots
    where it is non-zero is at least ``min_bin_pct`` (a fraction when ``<= 1``, else a percentage,
    as in splisosm 1.2.0, so ``1`` means 100 %) and its ``group_iso_by`` value is not missing.
    Genes with fewer than two kept isoforms are dropped. Genes come in order of first appearance
    in ``adata.var``; a gene's isoforms keep their var order, the last being the reference.

    Returns
    -------
    order
        Column positions of the kept isoforms, each gene's isoforms contiguous, genes in order of
        first appearance.
    keys
        The ``group_iso_by`` value of each gene.
    members
        Per gene, positions into ``order`` of its isoforms.

    Warns
    -----
    UserWarning
        Once, when genes are dropped because fewer than two of their isoforms passed the
        filters, or isoforms because they have no gene label.
    """
    counts = adata.layers[layer]
    n = adata.n_obs
    if sp.issparse(counts):
        csc = sp.csc_matrix(counts)
        totals = np.asarray(csc.sum(axis=0)).ravel()
        # Explicitly stored zeros are not expression: count positive entries, not stored ones.
        nonzero = np.asarray((csc > 0).sum(axis=0)).ravel()
    else:
        dense = np.asarray(counts)
        totals = dense.sum(axis=0)
        nonzero = (dense != 0).sum(axis=0)
    threshold = min_bin_pct if min_bin_pct <= 1 else min_bin_pct / 100.0
    group = adata.var[group_iso_by]
    passed = (totals >= min_counts) & (nonzero / max(n, 1) >= threshold) & group.notna().to_numpy()
    if not passed.any():
        raise ValueError(
            f"No isoform passes the filters (`min_counts`={min_counts}, `min_bin_pct`={min_bin_pct})"
        )
    kept = np.flatnonzero(passed)
    groups = pd.Series(group.to_numpy()[kept], dtype=object)
    per_gene = {key: idx for key, idx in groups.groupby(groups, sort=False).indices.items()}
    multi = [(k, kept[idx]) for k, idx in per_gene.items() if len(idx) >= 2]
    _warn_dropped(group, per_gene, group_iso_by)
    if not multi:
        raise ValueError(
            "No gene has at least 2 isoforms passing the filters; every gene was filtered out "
            f"(`min_counts`={min_counts}, `min_bin_pct`={min_bin_pct})"
        )
    # groupby(sort=False) keeps first-appearance order of the keys.
    order = np.concatenate([cols for _, cols in multi])
    starts = np.cumsum([0] + [len(cols) for _, cols in multi])
    members = [np.arange(starts[i], starts[i + 1]) for i in range(len(multi))]
    return order, [k for k, _ in multi], members


def _warn_dropped(group: pd.Series, per_gene: dict[Any, np.ndarray], group_iso_by: str) -> None:
    """One warning for the genes the isoform filters removed, split by why, and the isoforms
    left out for want of a gene label."""
    single = sum(len(idx) == 1 for idx in per_gene.values())
    none = group.dropna().nunique() - len(per_gene)
    unlabelled = int(group.isna().sum())
    parts = []
    if single:
        parts.append(f"{single} genes were dropped because fewer than 2 of their isoforms passed "
                     "the filters (a single isoform has no usage ratio to test)")
    if none:
        parts.append(f"{none} genes were dropped because none of their isoforms passed the "
                     "filters (e.g. all-zero or low counts)")
    if unlabelled:
        parts.append(f"{unlabelled} isoforms have no gene label (NaN in "
                     f"adata.var[{group_iso_by!r}]) and were left out")
    if parts:
        warnings.warn("; ".join(parts) + ".", UserWarning, stacklevel=4)


def gene_table(
    filtered: Any, *, layer: str, keys: list[Any], members: list[np.ndarray], gene_names: str | None
) -> GeneTable:
    """Per-gene float32 count tensors and display names from the filtered AnnData."""
    if gene_names is not None and gene_names not in filtered.var.columns:
        raise ValueError(
            f"`gene_names`={gene_names!r} is not a column of adata.var "
            f"(available: {list(filtered.var.columns)})"
        )
    counts = filtered.layers[layer]
    dense = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    dense = dense.astype(np.float32, copy=False)
    label_col = filtered.var[gene_names].to_numpy() if gene_names is not None else None
    names = [
        str(label_col[idx[0]]) if label_col is not None else str(key)
        for key, idx in zip(keys, members)
    ]
    return GeneTable(
        counts=[torch.from_numpy(np.ascontiguousarray(dense[:, idx])) for idx in members],
        names=names,
        keys=list(keys),
        n_isos=[len(idx) for idx in members],
        var_index=members,
    )


def make_batches(n_isos: list[int], grouped: bool, batch_size: int,
                 mix_isoform_counts: bool = False) -> list[list[int]]:
    """Gene indices per batch.

    Ungrouped data yields single genes in gene order. Grouped data visits isoform counts in
    ascending order, keeps gene order within a count, and chunks each group into at most
    ``batch_size`` genes, so a batch never mixes isoform counts; with ``mix_isoform_counts``
    the same ordered genes are chunked as one sequence, so a batch may hold consecutive runs of
    several isoform counts (for fitters that fit such runs together).
    """
    if not grouped:
        return [[g] for g in range(len(n_isos))]
    groups = [[g for g, k in enumerate(n_isos) if k == m] for m in sorted(set(n_isos))]
    if mix_isoform_counts:
        groups = [[g for group in groups for g in group]]
    return [group[i : i + batch_size] for group in groups for i in range(0, len(group), batch_size)]


def same_size_groups(n_isos: list[int], genes: list[int]) -> list[list[int]]:
    """Split ``genes`` into lists of equal isoform count (for batched evaluation of stored fits)."""
    out: dict[int, list[int]] = {}
    for g in genes:
        out.setdefault(n_isos[g], []).append(g)
    return list(out.values())
