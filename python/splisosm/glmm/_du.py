"""The differential-usage tests: each covariate tested separately per gene (H0: ``beta_f = 0``).

* ``'score'`` (splisosm 1.2.0's test): conditional on the fitted random effect, with the
  covariate's own ``q x q`` block of the multinomial information. It ignores the variance the
  random effect absorbs, so its information is too large and the test is conservative.
* ``'marginal-score'``: the same score with the information of the marginal model,
  ``X^T V^-1 X`` with ``V = W^-1 + Sigma`` (``V^-1 = W - W H^-1 W`` from the fitted Laplace
  system ``H = Sigma^-1 + W``), made efficient against the intercept.
* ``'wald'``: for models fitted with the design; conditional, own block.
"""

from __future__ import annotations

import numpy as np
import torch

from splisosm.config import DUMethod
from splisosm.glmm import _marginal, _runner
from splisosm.glmm._fit import Fitted
from splisosm.glmm.stats import bh_adjust, chi2_pvalues, score_statistics, wald_statistics
from splisosm.results import DUResult

#: The rest of ``SplisosmGLMM.test_differential_usage``'s docstring: the tests, arguments, errors.
DU_TEST_DOC = """\
* ``'score'`` (splisosm 1.2.0's test): conditional on the fitted random effect; it
  ignores the variance the random effect absorbs, so it is conservative (false-positive
  rate about 0 at alpha 0.05 on simulated data) and loses power.
* ``'marginal-score'`` (recommended): the same score with the information of the
  marginal model; calibrated on null covariates, spatially smooth ones included. Best
  after ``fitting_method='marginal_newton'``, whose random effect sits at its mode.
* ``'wald'``: for models fitted with ``with_design_mtx=True`` (anti-conservative).

Parameters
----------
method
    ``'score'`` or ``'marginal-score'`` after a fit without the design, ``'wald'``
    after one with it.
print_progress
    Progress bar over isoform-count groups.
return_results
    Return the results as a dict (splisosm 1.2.0's layout: ``statistic`` and
    ``pvalue`` as tensors ``(n_genes, n_factors)``, ``method``, ``pvalue_adj``,
    ``converged``) as well as storing them as :attr:`du_results`.

Raises
------
ValueError
    No design matrix, unknown method, method inconsistent with ``with_design_mtx``, or
    no fitted models.
"""


def check_method(fitted: Fitted | None, design: torch.Tensor | None, method: str) -> None:
    """Refuse a test the set-up and fit cannot give, naming what to change."""
    if design is None:
        raise ValueError("No design matrix: pass `design_mtx` to setup_data() to test differential usage")
    method = DUMethod.check("method", method)
    with_design = fitted is not None and fitted.fit.with_design_mtx
    if method != DUMethod.WALD and with_design:
        raise ValueError("The score test needs models fitted without the design: fit(with_design_mtx=False)")
    if method == DUMethod.WALD and not with_design:
        raise ValueError("The Wald test needs models fitted with the design: fit(with_design_mtx=True)")
    if fitted is None:
        raise ValueError("No fitted models: call fit() first")


def du_test(fitted: Fitted, method: str, progress: bool) -> DUResult:
    """Statistics and p-values of every gene and covariate (the method already checked)."""
    key, X = fitted.config.model_type, fitted.setup.design

    def statistics(genes: list[int]) -> torch.Tensor:
        model = fitted.rebuild(key, genes)
        with torch.no_grad():
            probs = model.get_isoform_ratio().detach()
        device = probs.device
        if method == DUMethod.MARGINAL_SCORE:
            return _marginal_score(model, X.to(device)).to(torch.float32).cpu()
        counts = fitted.setup.counts_of(genes).to(device)
        if method == DUMethod.SCORE:
            return score_statistics(X.to(device), counts, probs).cpu()
        beta = torch.cat([fitted.states(key)[g].params["beta"] for g in genes]).to(device)
        return wald_statistics(fitted.design_for_models().to(device), counts, probs, beta).cpu()

    stat = torch.stack(_runner.evaluate_groups(fitted.groups(), statistics, fitted.setup.n_genes,
                                               progress, "DU test")).numpy()
    pvalue = chi2_pvalues(stat, np.array(fitted.setup.genes.n_isos)[:, None] - 1)
    converged = fitted.converged_genes((key,), stat, pvalue)
    return DUResult(genes=np.asarray(fitted.setup.genes.names, dtype=object),
                    covariates=fitted.setup.covariate_labels(), statistic=stat.astype(np.float32),
                    pvalue=pvalue.astype(np.float64), pvalue_adj=bh_adjust(pvalue),
                    converged=converged, method=str(method))


@torch.no_grad()
def _marginal_score(model, X: torch.Tensor) -> torch.Tensor:
    """Marginal score statistics of one rebuilt batch model (GLM: no random effect)."""
    counts = model.counts.to(torch.float64)
    fixed = model._fixed_eta().to(torch.float64)
    if not hasattr(model, "nu"):
        return _marginal.du_marginal_score(X, counts, torch.zeros_like(fixed), fixed, None, None, None)
    v, theta = model._variance(warn=False)
    return _marginal.du_marginal_score(X, counts, model.nu.to(torch.float64), fixed,
                                       v.to(torch.float64), theta.to(torch.float64), model.system)
