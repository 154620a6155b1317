"""The spatial-variability tests: the likelihood ratio (LLR) and the score test.

* LLR: ``T = 2 (l_M(full) - l_M(null))`` with ``l_M`` the Laplace marginal log-likelihood of
  the fitted full model and of the null model at the mode of its likelihood in the random and
  fixed effects. The null mode is found exactly (its Newton system splits by spot): a null fit
  stopped short of it made the statistic of non-spatial genes too large. Negative values
  (possible with early-stopped full fits) are reported as 0. ``theta = 0`` lies on the boundary
  of its range, so ``T`` is referred to the chi-bar-square mixture ``sum_k binom(C, k) 2^-C
  chi2(k)`` for the ``C`` variance components tested, or to spot-permuted refits.
* Score: at the mode of each white-noise (null) model, ``Q = sum_j r_j^T K r_j`` with ``r`` the
  multinomial residuals and ``K`` the spatial kernel, compared with its expectation given the
  residuals' own dispersion and referred to a shifted, scaled chi-square with the null mean,
  variance and skewness of the linearised marginal model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from splisosm._checks import check_int
from splisosm.config import DEFAULT_N_PERMS, ModelType, SVMethod
from splisosm.glmm import _marginal, _runner
from splisosm.glmm._fit import JOINT_METHODS, Fitted, batches, plan, resolve_n_jobs
from splisosm.glmm.stats import bh_adjust, chibar2_pvalues
from splisosm.results import SVResult
from splisosm.spatial._build import build_spatial

FULL, NULL = ModelType.FULL.value, ModelType.NULL.value
# the user's line, seen from a test function called by sv_test, called by the facade
_USER_LEVEL = 4


#: The rest of ``SplisosmGLMM.test_spatial_variability``'s docstring: the tests, arguments, results.
SV_TEST_DOC = """\
* ``'llr'``: twice the difference of the Laplace marginal log-likelihoods of the full
  and the null fit (needs ``fit(from_null=True)``), referred to the chi-bar-square
  mixture of the boundary null, or to spot-permuted refits. Calibrated only after a
  marginal fit (``'marginal_newton'``, ``'marginal_gd'``): the joint likelihood drives
  ``theta`` towards 1 for every gene, so after ``'joint_gd'`` the statistic is 0 for
  nearly every gene without a strong spatial pattern (a warning says so).
* ``'score'``: the score of a spatial variance component at the white-noise fits
  (those of ``fit(from_null=True)``, or of a ``'glmm-null'`` model, which fits nothing
  else), calibrated after every fitting method. A ``'glmm-null'`` model builds the
  spatial kernel its set-up would have had when the test first needs it.

Parameters
----------
method
    ``'llr'`` or ``'score'``.
use_perm_null
    LLR only: compare against statistics of spot-permuted data refitted as the data were.
return_results
    Return the results as a dict (splisosm 1.2.0's layout) as well as storing them.
print_progress
    Progress bars on stderr.
n_perms_per_gene
    Permutations when ``use_perm_null`` (default 20).
**kwargs
    ``n_jobs`` (workers per permutation refit, default 1) and ``random_seed`` (seed of
    the permutation draws).

Returns
-------
dict or None
    With ``return_results``: ``statistic``, ``pvalue``, ``df`` (variance components
    tested), ``method``, ``use_perm_null``, ``pvalue_adj``, ``converged``. The results
    stay available as :attr:`sv_results`.

Raises
------
ValueError
    Unknown method or kwargs, ``n_perms_per_gene < 1``, a permutation null with the
    score test, missing fits (LLR: full and null; score: null), or the score test on a
    kernel without eigenpairs.

Notes
-----
Permutation statistics are kept for the fit, number of permutations and seed; another
fit or number recomputes them, and reusing them prints ``Using cached permutation
results...``.
"""


@dataclass(frozen=True, eq=False)
class PermutationCache:
    """LLR statistics of spot-permuted refits, ``(n_perms, n_genes)``, for one fit and seed."""

    key: tuple[int, int, int | None]  # (fit generation, permutations, seed)
    stats: np.ndarray


def sv_test(fitted: Fitted | None, model_type: str, method: str, *, use_perm_null: bool,
            n_perms: int | None, progress: bool, cache: PermutationCache | None,
            kernel: tuple[torch.Tensor, torch.Tensor] | None, **kwargs: Any,
            ) -> tuple[SVResult, PermutationCache | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """Run the test ``method`` (see ``SplisosmGLMM.test_spatial_variability``).

    Returns the result, the permutation statistics to keep and the score test's kernel
    eigenpairs to keep (a white-noise model builds them once).
    """
    method = SVMethod.check("method", method)
    unknown = set(kwargs) - {"n_jobs", "random_seed"}
    if unknown:
        raise ValueError(f"Unknown keyword arguments for the permutation null: {sorted(unknown)}")
    if method == SVMethod.SCORE:
        if use_perm_null:
            raise ValueError("`use_perm_null` applies to method='llr' only")
        check_score_fits(fitted, model_type)
        kernel = score_kernel(fitted) if kernel is None else kernel
        return score_test(fitted, kernel, progress), cache, kernel
    if fitted is None:
        raise ValueError("The spatial variability test needs both full and null model fits: "
                         "call fit(from_null=True) first")
    result, cache = llr_test(fitted, use_perm_null=use_perm_null, n_perms=n_perms, progress=progress,
                             cache=cache, **kwargs)
    return result, cache, kernel


def variance_components(fitted: Fitted) -> np.ndarray:
    """Per gene, the variance components a spatial test tests (1 when they are shared)."""
    share = fitted.config.share_variance
    return np.array([1 if share else m - 1 for m in fitted.setup.genes.n_isos], dtype=int)


def llr_test(fitted: Fitted, *, use_perm_null: bool, n_perms: int | None, progress: bool,
             cache: PermutationCache | None, n_jobs: int = 1,
             random_seed: int | None = None) -> tuple[SVResult, PermutationCache | None]:
    """The LLR test, and the permutation statistics it used (None without permutations)."""
    if not fitted.has(FULL, NULL):
        raise ValueError("The spatial variability test needs both full and null model fits: "
                         "call fit(from_null=True) first")
    method = fitted.config.fitting_method
    if method in JOINT_METHODS:
        warnings.warn(
            f"the LLR after fitting_method={method!r} is very conservative: the joint likelihood "
            "drives theta towards 1 for spatial and non-spatial genes alike, so the statistic is "
            "0 for nearly every gene without a strong spatial pattern. Fit with "
            "fitting_method='marginal_newton' for the LLR, or use "
            "test_spatial_variability(method='score').", UserWarning, stacklevel=_USER_LEVEL)
    df = variance_components(fitted)
    stat = llr_statistics(fitted, fitted.setup.genes.counts, fitted.design_for_models(),
                          fitted.fit.states, progress)
    if use_perm_null:
        n_perms = check_int("n_perms_per_gene", DEFAULT_N_PERMS if n_perms is None else n_perms,
                            minimum=1)
        cache = permutation_stats(fitted, n_perms, cache, progress=progress, n_jobs=n_jobs,
                                  random_seed=random_seed)
        pvalue = (1 + (cache.stats >= stat[None, :]).sum(0)) / (n_perms + 1)
    else:
        pvalue = chibar2_pvalues(stat, df)
    converged = fitted.converged_genes((FULL, NULL), stat, pvalue, stacklevel=_USER_LEVEL + 1)
    return _result(fitted, stat, pvalue, df, converged, "llr", use_perm_null), cache


def score_test(fitted: Fitted, kernel: tuple[torch.Tensor, torch.Tensor], progress: bool) -> SVResult:
    """The score test from the white-noise fits and the kernel's eigenpairs ``(lam, U)``."""
    lam, U = kernel

    def score(genes: list[int]) -> torch.Tensor:
        out = _marginal.sv_score(*null_at_mode(fitted.rebuild(NULL, genes)), lam, U)
        return torch.from_numpy(np.stack([out["statistic"], out["pvalue"]], axis=1))

    rows = torch.stack(_runner.evaluate_groups(fitted.groups(), score, fitted.setup.n_genes,
                                               progress, "SV score")).numpy()
    stat, pvalue = rows[:, 0].copy(), rows[:, 1].astype(np.float64)
    converged = fitted.converged_genes((NULL,), stat, pvalue, stacklevel=_USER_LEVEL + 1)
    return _result(fitted, stat, pvalue, variance_components(fitted), converged, "score", False)


def check_score_fits(fitted: Fitted | None, model_type: str) -> None:
    """The score test's needs: white-noise fits (``fit(from_null=True)`` or a glmm-null model)."""
    if model_type == ModelType.GLM:
        raise ValueError(
            "The spatial variability score test needs white-noise random-effect fits: set up "
            "with model_type='glmm-null' (fits only those, the cheapest) or model_type="
            "'glmm-full' and fit(from_null=True)")
    if fitted is None or not fitted.has(NULL):
        call = "fit()" if model_type == ModelType.NULL else "fit(from_null=True)"
        raise ValueError(f"The spatial variability score test needs the null model fits: call {call} first")


def score_kernel(fitted: Fitted) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the spatial kernel for the score test, float64 on the model's device.

    A 'glmm-full' model has them from its set-up; a 'glmm-null' model builds the kernel it would
    have had (same ``k_neighbors``, ``rho``, ``approx_rank``) from the set-up's spots.
    """
    config, setup = fitted.config, fitted.setup
    if config.model_type == ModelType.FULL:
        payload = setup.kernel
    elif setup.spatial_inputs is None or all(x is None for x in setup.spatial_inputs.values()):
        raise ValueError(
            "The spatial variability score test needs the spots' coordinates or graph, which "
            "this model does not hold (a model restored by load() keeps none): call "
            "setup_data() again")
    else:
        _, payload = build_spatial(FULL, n=setup.n_spots, k_neighbors=config.k_neighbors,
                                   rho=config.rho, approx_rank=config.approx_rank,
                                   **setup.spatial_inputs)
    if payload.eigvecs is None:
        raise ValueError(
            "The spatial variability score test needs the kernel's eigenpairs; this model uses "
            "the sparse precision only (approx_rank=None): set approx_rank to a number of eigenpairs")
    return tuple(torch.from_numpy(x).to(config.device, torch.float64)
                 for x in (payload.eigvals, payload.eigvecs))


def llr_statistics(fitted: Fitted, counts: list[torch.Tensor], design: torch.Tensor | None,
                   states: dict[str, list[_runner.GeneState]], progress: bool) -> np.ndarray:
    """Clamped LLR statistics per gene from full and null states on ``counts``."""

    def marginal(genes: list[int]) -> torch.Tensor:
        values = []
        for key in (FULL, NULL):
            model = fitted.rebuild(key, genes, counts=counts, design=design, states=states[key])
            if key == NULL:
                # A null fit stopped short of its optimum inflates every statistic; its mode is
                # cheap to find exactly (per-spot blocks), so take it there.
                null_at_mode(model)
            with torch.no_grad():
                values.append(model.marginal_loglik().detach().cpu().double())
        return 2.0 * (values[0] - values[1])

    rows = _runner.evaluate_groups(fitted.groups(), marginal, fitted.setup.n_genes, progress, "LLR")
    return np.clip(torch.stack(rows).numpy(), 0.0, None)


def permutation_stats(fitted: Fitted, n_perms: int, cache: PermutationCache | None, *,
                      progress: bool, n_jobs: int, random_seed: int | None) -> PermutationCache:
    """LLR statistics of ``n_perms`` spot permutations, each refitted as the data were."""
    key = (fitted.fit.generation, n_perms, random_seed)
    if cache is not None and cache.key == key:
        print("Using cached permutation results...")
        return cache
    setup, fit = fitted.setup, fitted.fit
    n_jobs = resolve_n_jobs(n_jobs, fitted.config.device)
    fit_plan = plan(fitted.config, from_null=True, refit_null=fit.refit_null, quiet=True)
    gene_batches = batches(setup, fit_plan, fit.batch_size, n_jobs)
    # All permutations come from one generator drawn up front, independent of the fitting code,
    # which may reseed torch's global generator.
    rng = np.random.default_rng(random_seed)
    perms = [rng.permutation(setup.n_spots) for _ in range(n_perms)]
    seeds = rng.integers(0, 2**31 - 1, size=n_perms) if random_seed is not None else [None] * n_perms
    design = fitted.design_for_models()
    stats = np.zeros((n_perms, setup.n_genes))
    for b in tqdm(range(n_perms), desc="Permutations", disable=not progress):
        idx = torch.as_tensor(perms[b])
        counts = [c[idx] for c in setup.genes.counts]
        perm_design = None if design is None else design[idx.to(design.device)]
        states = _runner.run_batches(fit_plan, counts, perm_design, setup.kernel, gene_batches,
                                     n_jobs=n_jobs, random_seed=None if seeds[b] is None else int(seeds[b]))
        stats[b] = llr_statistics(fitted, counts, perm_design, states, False)
    return PermutationCache(key=key, stats=stats)


@torch.no_grad()
def null_at_mode(model) -> tuple[torch.Tensor, ...]:
    """Move a rebuilt null model's random and fixed effects to the mode of its joint likelihood.

    Returns the float64 ``counts, nu, omega, v, Xt`` of :func:`splisosm.glmm._marginal.sv_score`.
    """
    counts = model.counts.to(torch.float64)
    v = model._variance(warn=False)[0].to(torch.float64)
    Xt = _marginal.with_intercept(model.X if model.n_factors else None, model.n_spots, counts)
    omega = torch.cat([model.beta.to(torch.float64), model.bias_eta[:, None].to(torch.float64)], dim=1)
    nu, omega = _marginal.null_mode(counts, model.nu.to(torch.float64), omega, v, Xt)
    model.nu.copy_(nu)
    model.beta.copy_(omega[:, :-1])
    model.bias_eta.copy_(omega[:, -1])
    return counts, nu, omega, v, Xt


def _result(fitted: Fitted, stat: np.ndarray, pvalue: np.ndarray, df: np.ndarray,
            converged: np.ndarray, method: str, use_perm_null: bool) -> SVResult:
    return SVResult(genes=np.asarray(fitted.setup.genes.names, dtype=object),
                    statistic=stat.astype(np.float32), pvalue=np.asarray(pvalue, dtype=np.float64),
                    pvalue_adj=bh_adjust(pvalue), df=df, converged=converged, method=method,
                    use_perm_null=bool(use_perm_null))


