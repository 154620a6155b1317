"""Results of the spatial-variability and differential-usage tests as value objects.

Each result holds numpy arrays only, knows the genes (and covariates) its rows belong to, and
turns itself into a tidy table with :meth:`~SVResult.to_frame`. ``to_dict``/``from_dict`` give
the plain layout that model files store; :func:`legacy_dict` gives the dict that
``test_spatial_variability(return_results=True)`` and ``test_differential_usage(...)`` return,
laid out as splisosm 1.2.0 returned it (the differential-usage statistic and p-values as torch
tensors), so that scripts written for it keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["SVResult", "DUResult", "legacy_dict"]


def _converged_rows(converged: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """Per table row, its gene's convergence flag; None where the flags were not recorded."""
    if converged is None:
        return np.full(len(rows), None, dtype=object)
    return np.asarray(converged, dtype=bool)[rows]


def _optional_flags(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=bool)


@dataclass(frozen=True, eq=False)
class SVResult:
    """Spatial-variability test results, one entry per gene.

    Attributes
    ----------
    genes
        Display names of the genes, in gene order.
    statistic
        Test statistic per gene (float32).
    pvalue
        p-value per gene (float64).
    pvalue_adj
        Benjamini–Hochberg adjusted p-values over genes (float64).
    df
        Number of variance components tested per gene.
    converged
        Whether every fit the test read met its early-stopping rule (None in files saved before
        this flag was recorded).
    method
        ``'llr'`` or ``'score'``.
    use_perm_null
        Whether the p-values come from spot permutations rather than the asymptotic null.
    """

    genes: np.ndarray
    statistic: np.ndarray
    pvalue: np.ndarray
    pvalue_adj: np.ndarray
    df: np.ndarray
    converged: np.ndarray | None
    method: str
    use_perm_null: bool

    def to_frame(self) -> pd.DataFrame:
        """One row per gene: ``gene, statistic, pvalue, pvalue_adj, converged``."""
        rows = np.arange(len(self.genes))
        return pd.DataFrame({
            "gene": np.asarray(self.genes, dtype=object),
            "statistic": self.statistic,
            "pvalue": self.pvalue,
            "pvalue_adj": self.pvalue_adj,
            "converged": _converged_rows(self.converged, rows),
        })

    def to_dict(self) -> dict[str, Any]:
        """Arrays and settings by name (without the gene names), as model files store them."""
        out = {"statistic": self.statistic, "pvalue": self.pvalue, "df": self.df,
               "method": self.method, "use_perm_null": self.use_perm_null,
               "pvalue_adj": self.pvalue_adj}
        if self.converged is not None:
            out["converged"] = self.converged
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], genes: list[str]) -> SVResult:
        """The result stored by :meth:`to_dict` (arrays may be numpy arrays or tensors)."""
        return cls(
            genes=np.asarray(genes, dtype=object),
            statistic=np.asarray(values["statistic"], dtype=np.float32),
            pvalue=np.asarray(values["pvalue"], dtype=np.float64),
            pvalue_adj=np.asarray(values["pvalue_adj"], dtype=np.float64),
            df=np.asarray(values["df"], dtype=np.int64),
            converged=_optional_flags(values.get("converged")),
            method=str(values["method"]),
            use_perm_null=bool(values["use_perm_null"]),
        )


@dataclass(frozen=True, eq=False)
class DUResult:
    """Differential-usage test results, one entry per gene and covariate.

    Attributes
    ----------
    genes
        Display names of the genes, in gene order.
    covariates
        Names of the covariates tested.
    statistic
        ``(n_genes, n_covariates)`` test statistics (float32).
    pvalue
        ``(n_genes, n_covariates)`` p-values (float64).
    pvalue_adj
        Benjamini–Hochberg adjusted p-values over genes, per covariate (float64).
    converged
        Per gene, whether its fit met its early-stopping rule (None in files saved before this
        flag was recorded).
    method
        ``'score'``, ``'marginal-score'`` or ``'wald'``.
    """

    genes: np.ndarray
    covariates: list[str]
    statistic: np.ndarray
    pvalue: np.ndarray
    pvalue_adj: np.ndarray
    converged: np.ndarray | None
    method: str

    def to_frame(self) -> pd.DataFrame:
        """Gene-major rows ``gene, covariate, statistic, pvalue, pvalue_adj, converged``."""
        n_genes, n_cov = self.statistic.shape
        rows = np.repeat(np.arange(n_genes), n_cov)
        return pd.DataFrame({
            "gene": np.asarray(self.genes, dtype=object)[rows],
            "covariate": np.tile(np.asarray(self.covariates, dtype=object), n_genes),
            "statistic": self.statistic.reshape(-1),
            "pvalue": self.pvalue.reshape(-1),
            "pvalue_adj": self.pvalue_adj.reshape(-1),
            "converged": _converged_rows(self.converged, rows),
        })

    def to_dict(self) -> dict[str, Any]:
        """Arrays and settings by name (without gene and covariate names), as model files store them."""
        out = {"statistic": self.statistic, "pvalue": self.pvalue, "method": self.method,
               "pvalue_adj": self.pvalue_adj}
        if self.converged is not None:
            out["converged"] = self.converged
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], genes: list[str], covariates: list[str]) -> DUResult:
        """The result stored by :meth:`to_dict` (arrays may be numpy arrays or tensors)."""
        return cls(
            genes=np.asarray(genes, dtype=object),
            covariates=list(covariates),
            statistic=np.asarray(values["statistic"], dtype=np.float32),
            pvalue=np.asarray(values["pvalue"], dtype=np.float64),
            pvalue_adj=np.asarray(values["pvalue_adj"], dtype=np.float64),
            converged=_optional_flags(values.get("converged")),
            method=str(values["method"]),
        )


def legacy_dict(result: SVResult | DUResult) -> dict[str, Any]:
    """The result as the dict of splisosm 1.2.0: differential-usage statistics and p-values as tensors."""
    out = result.to_dict()
    if isinstance(result, DUResult):
        out["statistic"] = torch.from_numpy(result.statistic.copy())
        out["pvalue"] = torch.from_numpy(result.pvalue.copy())
    return out
