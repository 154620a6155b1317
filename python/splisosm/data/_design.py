"""Design-matrix parsing for :class:`splisosm.hyptest_glmm.SplisosmGLMM`.

A design is one or more obs columns (categorical columns one-hot encoded with all their levels,
others cast to float32), a DataFrame, a tensor, a scipy sparse matrix or a numpy array, resolved
on the filtered AnnData as splisosm 1.2.0 does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

#: Sample standard deviation below which a covariate is reported as (near) constant.
NEAR_ZERO_STD = 1e-5


def is_obs_reference(design: Any) -> bool:
    """Whether ``design`` names obs columns (a string or a non-empty list of strings)."""
    if isinstance(design, str):
        return True
    return (
        isinstance(design, (list, tuple))
        and len(design) > 0
        and all(isinstance(c, str) for c in design)
    )


def subset_rows(design: Any, keep: np.ndarray) -> Any:
    """Row-subset an array-like design to the spots in the boolean mask ``keep``.

    Obs-column references are returned unchanged (they are resolved on the filtered AnnData).
    A 1-D numpy design is indexed along its only axis (splisosm 1.2.0 indexed it with two
    indices and raised ``IndexError``).
    """
    if design is None or is_obs_reference(design):
        return design
    if isinstance(design, pd.DataFrame):
        return design.iloc[np.flatnonzero(keep)]
    if isinstance(design, torch.Tensor):
        return design[torch.as_tensor(np.flatnonzero(keep), device=design.device)]
    if sp.issparse(design):
        return sp.csr_matrix(design)[np.flatnonzero(keep)]
    if isinstance(design, np.ndarray):
        return design[keep]
    return design


def _obs_columns(obs: pd.DataFrame, columns: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        raise ValueError(
            f"`design_mtx` refers to obs columns that do not exist: {missing}; "
            f"available columns: {list(obs.columns)}"
        )
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for col in columns:
        values = obs[col]
        if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object:
            cat = values if isinstance(values.dtype, pd.CategoricalDtype) else values.astype("category")
            if cat.isna().any():
                # One-hot encoding would give these spots all-zero rows: a level of their own
                # that nobody asked for.
                raise ValueError(
                    f"obs column {col!r} used in `design_mtx` has {int(cat.isna().sum())} missing "
                    "(NaN) values; fill them or drop those spots before setup_data()"
                )
            # All levels are kept (no reference level dropped): each level is tested on its own.
            onehot = np.stack(
                [(cat == level).to_numpy(dtype=np.float32) for level in cat.cat.categories], axis=1
            ) if len(cat.cat.categories) else np.zeros((len(cat), 0), np.float32)
            blocks.append(onehot)
            names.extend(f"{col}_{level}" for level in cat.cat.categories)
        else:
            try:
                blocks.append(values.to_numpy(dtype=np.float32)[:, None])
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"obs column {col!r} (dtype {values.dtype}) cannot be used as a covariate: {err}"
                ) from None
            names.append(str(col))
    return np.concatenate(blocks, axis=1), names


def _array_design(design: Any) -> tuple[np.ndarray, list[str] | None]:
    if isinstance(design, pd.DataFrame):
        try:
            values = design.to_numpy(dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"`design_mtx` DataFrame must hold numeric columns only: {err}"
            ) from None
        return values, [str(c) for c in design.columns]
    if isinstance(design, torch.Tensor):
        values = design.detach().cpu().numpy().astype(np.float32)
    elif sp.issparse(design):
        values = np.asarray(design.toarray(), dtype=np.float32)
    elif isinstance(design, np.ndarray):
        try:
            values = design.astype(np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`design_mtx` array must be numeric: {err}") from None
    else:
        raise TypeError(
            "`design_mtx` must be an obs column name, a list of obs column names, a pandas "
            "DataFrame, a numpy array, a scipy sparse matrix or a torch tensor; got "
            f"{type(design).__name__}"
        )
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"`design_mtx` must be 1-D or 2-D, got shape {values.shape}")
    return values, None


def resolve_design(
    design: Any,
    obs: pd.DataFrame,
    n_spots: int,
    covariate_names: Sequence[str] | None,
) -> tuple[np.ndarray | None, list[str] | None]:
    """Turn any accepted design form into a float32 ``(n_spots, P)`` matrix and covariate names.

    Parameters
    ----------
    design
        obs column name(s), DataFrame, numpy array, scipy sparse matrix or torch tensor, or None.
    obs
        The obs table of the filtered AnnData (used for column references).
    n_spots
        Number of spots after filtering; the design must have this many rows.
    covariate_names
        Explicit names overriding the inferred ones; must have one entry per column.

    Returns
    -------
    matrix, names
        ``(None, None)`` when ``design`` is None.

    Raises
    ------
    TypeError
        Unsupported design type.
    ValueError
        Missing obs columns, non-numeric or non-finite values, wrong row count, or
        ``covariate_names`` of the wrong length.

    Warns
    -----
    UserWarning
        One per column whose sample standard deviation is below ``1e-5``.
    """
    if design is None:
        return None, None
    if is_obs_reference(design):
        columns = [design] if isinstance(design, str) else list(design)
        matrix, names = _obs_columns(obs, columns)
    else:
        matrix, inferred = _array_design(design)
        names = inferred or [f"factor_{i + 1}" for i in range(matrix.shape[1])]
    if matrix.shape[0] != n_spots:
        raise ValueError(
            f"`design_mtx` has {matrix.shape[0]} rows but there are {n_spots} spots after filtering"
        )
    if matrix.shape[1] == 0:
        raise ValueError("`design_mtx` has no columns")
    if not np.isfinite(matrix).all():
        bad = [names[j] for j in np.flatnonzero(~np.isfinite(matrix).all(axis=0))]
        raise ValueError(f"`design_mtx` contains NaN or infinite values in columns {bad}")
    if covariate_names is not None:
        covariate_names = [str(c) for c in covariate_names]
        if len(covariate_names) != matrix.shape[1]:
            raise ValueError(
                f"`covariate_names` has {len(covariate_names)} entries but the design matrix "
                f"has {matrix.shape[1]} columns"
            )
        names = covariate_names
    std = matrix.std(axis=0, ddof=1) if matrix.shape[0] > 1 else np.zeros(matrix.shape[1])
    for j in np.flatnonzero(std < NEAR_ZERO_STD):
        # warn_explicit bypasses the once-per-location filter so every column is reported.
        warnings.warn_explicit(
            f"Covariate {names[j]!r} has near-zero variance (std {std[j]:.2e}); consider removing it.",
            UserWarning,
            filename=__file__,
            lineno=0,
            registry=None,
        )
    return matrix, names
