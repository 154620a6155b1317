"""Tiny synthetic isoform datasets for the SplisosmGLMM API tests (fast, fully controlled)."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def grid_coords(side: int) -> np.ndarray:
    """``(side**2, 2)`` coordinates of a square lattice."""
    xs, ys = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def make_adata(
    side: int = 8,
    n_isos: Sequence[int] = (2, 3, 2, 3),
    *,
    depth: float = 30.0,
    du_effect: Sequence[float] | None = None,
    spatial_sd: float = 0.5,
    seed: int = 0,
    sparse: bool = False,
) -> ad.AnnData:
    """Isoform counts on a ``side x side`` grid.

    Each gene's logits are a random intercept, a smooth spatial wave times ``spatial_sd`` and
    ``du_effect[g]`` times the covariate ``obs['cov']`` (default 0: no differential usage).
    obs also holds a two-level categorical ``'region'`` and a boolean ``'flag'``; var holds
    ``gene_symbol`` (group key ``G<i>``) and ``gene_label`` (display name ``Label<i>``).
    """
    rng = np.random.default_rng(seed)
    coords = grid_coords(side)
    n = coords.shape[0]
    cov = rng.normal(size=n).astype(np.float32)
    effects = np.zeros(len(n_isos)) if du_effect is None else np.asarray(du_effect, dtype=float)
    blocks, symbols, labels, names = [], [], [], []
    for g, m in enumerate(n_isos):
        phase = rng.uniform(0, 2 * np.pi, size=m)
        wave = np.sin(coords[:, :1] / side * 2 * np.pi + phase[None, :])
        logits = rng.normal(scale=0.5, size=m)[None, :] + spatial_sd * wave
        logits[:, 0] += effects[g] * cov
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        totals = rng.poisson(depth, size=n)
        blocks.append(np.stack([rng.multinomial(t, pi) for t, pi in zip(totals, p)]))
        symbols += [f"G{g}"] * m
        labels += [f"Label{g}"] * m
        names += [f"G{g}_T{j}" for j in range(m)]
    counts = np.concatenate(blocks, axis=1).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cov": cov,
            "region": pd.Categorical(np.where(coords[:, 0] < side / 2, "left", "right")),
            "flag": coords[:, 1] < side / 2,
        },
        index=[f"s{i}" for i in range(n)],
    )
    var = pd.DataFrame({"gene_symbol": symbols, "gene_label": labels}, index=names)
    adata = ad.AnnData(X=sp.csr_matrix(counts) if sparse else counts.copy(), obs=obs, var=var)
    adata.layers["counts"] = sp.csr_matrix(counts) if sparse else counts
    adata.obsm["spatial"] = coords
    return adata
