"""The test results as value objects: tables, stored layout, and the dicts of splisosm 1.2.0."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from splisosm.results import DUResult, SVResult, legacy_dict


def _du(converged=(True, False, True)) -> DUResult:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(3, 2))
    return DUResult(genes=np.array(["a", "b", "a"], dtype=object), covariates=["x", "y"],
                    statistic=rng.chisquare(2, size=(3, 2)).astype(np.float32), pvalue=p,
                    pvalue_adj=np.minimum(2 * p, 1.0),
                    converged=None if converged is None else np.array(converged), method="score")


def _sv() -> SVResult:
    return SVResult(genes=np.array(["a", "b"], dtype=object), statistic=np.array([0.0, 3.5], np.float32),
                    pvalue=np.array([1.0, 0.03]), pvalue_adj=np.array([1.0, 0.06]),
                    df=np.array([1, 2]), converged=np.array([True, True]), method="llr",
                    use_perm_null=False)


def test_du_frame_is_gene_major_and_keeps_duplicate_names() -> None:
    result = _du()
    frame = result.to_frame()
    assert list(frame.columns) == ["gene", "covariate", "statistic", "pvalue", "pvalue_adj", "converged"]
    assert list(frame["gene"]) == ["a", "a", "b", "b", "a", "a"]
    assert list(frame["covariate"]) == ["x", "y"] * 3
    np.testing.assert_array_equal(frame["pvalue"].to_numpy(), result.pvalue.reshape(-1))
    assert list(frame["converged"]) == [True, True, False, False, True, True]
    assert list(_du(converged=None).to_frame()["converged"]) == [None] * 6


def test_sv_frame() -> None:
    frame = _sv().to_frame()
    pd.testing.assert_series_equal(frame["statistic"], pd.Series([0.0, 3.5], dtype=np.float32, name="statistic"))
    assert list(frame["gene"]) == ["a", "b"]


@pytest.mark.parametrize("make", [_du, _sv])
def test_stored_layout_round_trips(make) -> None:
    result = make()
    names = {"genes": list(result.genes)}
    if isinstance(result, DUResult):
        names["covariates"] = result.covariates
    # a file stores arrays as tensors; either kind comes back the same
    stored = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in result.to_dict().items()}
    back = type(result).from_dict(stored, **names)
    pd.testing.assert_frame_equal(back.to_frame(), result.to_frame())


def test_legacy_dicts_have_the_types_of_1_2_0() -> None:
    result = _du()
    du = legacy_dict(result)
    assert du["statistic"].dtype == torch.float32 and du["pvalue"].dtype == torch.float64
    assert isinstance(du["pvalue_adj"], np.ndarray) and du["method"] == "score"
    du["statistic"][0, 0] = -1.0  # the caller's copy, not the result's
    assert result.statistic[0, 0] >= 0
    sv = legacy_dict(_sv())
    assert set(sv) == {"statistic", "pvalue", "df", "method", "use_perm_null", "pvalue_adj", "converged"}
    assert all(isinstance(sv[k], np.ndarray) for k in ("statistic", "pvalue", "df", "pvalue_adj"))
