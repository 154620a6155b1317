"""Gene- and isoform-level feature summaries of filtered isoform counts.

The columns are those of splisosm 1.2.0's ``extract_feature_summary`` (gene: ``n_isos``,
``perplexity``, ``pct_bin_on``, ``count_avg``, ``count_std``, ``major_ratio_avg``; isoform: the var
columns followed by count and ratio statistics).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm


def feature_summaries(
    filtered_adata,
    *,
    layer: str,
    var_index: Sequence[np.ndarray],
    gene_names: Sequence[str],
    print_progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compute the gene table and the isoform table together.

    Parameters
    ----------
    filtered_adata
        AnnData whose isoform columns are grouped gene by gene.
    layer
        Counts layer.
    var_index
        Per gene, the column positions of its isoforms.
    gene_names
        Display name per gene (index of the gene table).
    print_progress
        Show a progress bar over genes on stderr.

    Returns
    -------
    gene_df, isoform_df
        See :meth:`splisosm.hyptest_glmm.SplisosmGLMM.extract_feature_summary`.
    """
    if len(var_index) != len(gene_names):
        raise ValueError(
            f"{len(var_index)} genes in the filtered data but {len(gene_names)} gene names"
        )
    counts = filtered_adata.layers[layer]
    dense = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    dense = dense.astype(np.float64, copy=False)
    n = dense.shape[0]
    n_iso_total = dense.shape[1]
    iso = {
        key: np.zeros(n_iso_total)
        for key in ("pct_bin_on", "count_total", "count_avg", "count_std", "ratio_total", "ratio_avg", "ratio_std")
    }
    gene_rows = []
    for cols in tqdm(var_index, desc="Summarising genes", disable=not print_progress):
        Y = dense[:, cols]
        N = Y.sum(axis=1)
        T_i = Y.sum(axis=0)
        T = T_i.sum()
        R = T_i / T if T > 0 else np.zeros_like(T_i)
        on = N > 0
        nz = R[R > 0]
        gene_rows.append(
            {
                "n_isos": len(cols),
                "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
                "pct_bin_on": float(on.mean()),
                "count_avg": float(T / n),
                "count_std": float(N.std()),
                "major_ratio_avg": float(R.max()),
            }
        )
        iso["pct_bin_on"][cols] = (Y > 0).mean(axis=0)
        iso["count_total"][cols] = T_i
        iso["count_avg"][cols] = T_i / n
        iso["count_std"][cols] = Y.std(axis=0)
        iso["ratio_total"][cols] = R
        if on.any():
            ratios = Y[on] / N[on, None]
            iso["ratio_avg"][cols] = ratios.mean(axis=0)
            iso["ratio_std"][cols] = ratios.std(axis=0)
    gene_df = pd.DataFrame(gene_rows, index=pd.Index(list(gene_names), name="gene"))
    gene_df["n_isos"] = gene_df["n_isos"].astype(int)
    iso_df = filtered_adata.var.copy()
    for key, values in iso.items():
        iso_df[key] = values
    return gene_df, iso_df
