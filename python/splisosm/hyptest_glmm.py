"""The :class:`SplisosmGLMM` facade: a validated config and the records of set-up, fit and tests."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from splisosm._checks import check_int
from splisosm._docs import fill_doc
from splisosm.config import APPROX_RANK_AUTO, SETTINGS_DOC, Backend, GLMMConfig, ModelType, configs_announced
from splisosm.data import _setup
from splisosm.data.summary import feature_summaries
from splisosm.glmm import _du, _fit, _sv
from splisosm.glmm._fitting import check_device
from splisosm.glmm.isomodels import IsoFullModel, IsoNullNoSpVar
from splisosm.io.adata import DEFAULT_KEY, WRITE_RESULTS_DOC, write_analysis
from splisosm.io.persistence import LOAD_DOC, SavedModel, load_model, save_model
from splisosm.results import DUResult, SVResult, legacy_dict

__all__ = ["SplisosmGLMM", "IsoFullModel", "IsoNullNoSpVar"]

_APPROX_RANK_AUTO = APPROX_RANK_AUTO  # the name splisosm 1.2.0 gives the default; scripts import it
_DEFAULTS = GLMMConfig()


@fill_doc(settings=SETTINGS_DOC)
class SplisosmGLMM:
    """Spatial isoform statistics with per-gene multinomial GLM(M)s.

    Wraps the per-gene models :class:`splisosm.model.MultinomGLMM` (through
    :class:`IsoFullModel` / :class:`IsoNullNoSpVar`) and :class:`splisosm.model.MultinomGLM` for
    batched fitting, the spatial-variability (SV) tests (score and likelihood ratio) and the
    differential-usage (DU) tests (marginal score, conditional score and Wald).

    The defaults are those of splisosm 1.2.0. For calibrated p-values fit with
    ``fitting_method='marginal_newton'`` and use ``test_differential_usage(method=
    'marginal-score')`` and ``test_spatial_variability(method='score')``.

    Parameters
    ----------
    {settings}

    Raises
    ------
    ValueError
        Any invalid setting, at construction rather than inside ``fit()``, naming the setting.

    Examples
    --------
    >>> model = SplisosmGLMM(model_type="glmm-full", fitting_method="marginal_newton")
    >>> model.setup_data(adata, layer="counts", group_iso_by="gene_symbol",
    ...                  group_gene_by_n_iso=True, design_mtx="covariate")
    >>> model.fit(batch_size=20, from_null=True)
    >>> model.test_differential_usage(method="marginal-score")
    >>> model.test_spatial_variability(method="score")
    >>> model.du_results.to_frame()
    """

    #: Source AnnData (the caller's object); None before setup_data() and after load().
    adata: Any

    def __init__(
        self,
        model_type: Literal["glmm-full", "glmm-null", "glm"] = _DEFAULTS.model_type,
        share_variance: bool = _DEFAULTS.share_variance,
        var_fix_sigma: bool = _DEFAULTS.var_fix_sigma,
        var_prior_model: str = _DEFAULTS.var_prior_model,
        var_prior_model_params: dict | None = None,
        init_ratio: str = _DEFAULTS.init_ratio,
        fitting_method: str = _DEFAULTS.fitting_method,
        fitting_configs: dict | None = None,
        k_neighbors: int = _DEFAULTS.k_neighbors,
        rho: float = _DEFAULTS.rho,
        approx_rank: int | None = _APPROX_RANK_AUTO,
        device: str = _DEFAULTS.device,
    ) -> None:
        check_device(device)
        config = GLMMConfig(
            model_type=model_type, share_variance=share_variance, var_fix_sigma=var_fix_sigma,
            var_prior_model=var_prior_model, var_prior_model_params=var_prior_model_params,
            init_ratio=init_ratio, fitting_method=fitting_method, fitting_configs=fitting_configs,
            k_neighbors=k_neighbors, rho=rho, approx_rank=approx_rank, device=device)
        config.warn_unused(stacklevel=2)
        self.config = config
        self.adata = None
        self._setup: _setup.SetupRecord | None = None
        self._summaries: tuple[pd.DataFrame, pd.DataFrame] | None = None
        self._score_kernel: tuple[torch.Tensor, torch.Tensor] | None = None
        self._clear_fit()

    def _clear_fit(self) -> None:
        self._fit: _fit.FitRecord | None = None
        self._sv: SVResult | None = None
        self._du: DUResult | None = None
        self._permutations: _sv.PermutationCache | None = None

    # ------------------------------------------------------------------ settings and records
    model_type = property(lambda self: self.config.model_type, doc="The model type.")
    k_neighbors = property(lambda self: self.config.k_neighbors, doc="Neighbours of the k-NN graph.")
    rho = property(lambda self: self.config.rho, doc="Spatial autocorrelation of the kernel.")
    approx_rank = property(lambda self: self.config.approx_rank, doc="Kernel eigenpairs kept.")
    device = property(lambda self: self.config.device, doc="Device of the per-gene models.")
    model_configs = property(lambda self: self.config.model_configs(),
                             doc="Settings of the per-gene models (a fresh dict).")
    setup_record = property(lambda self: self._setup, doc="What setup_data() produced, or None.")
    fit_record = property(lambda self: self._fit, doc="What the last fit() produced, or None.")
    sv_results = property(lambda self: self._sv, doc="The last SV test's :class:`~splisosm.results.SVResult`, or None.")
    du_results = property(lambda self: self._du, doc="The last DU test's :class:`~splisosm.results.DUResult`, or None.")
    permutation_cache = property(lambda self: self._permutations,
                                 doc="LLR statistics of the last permutation null, or None.")
    # where splisosm 1.2.0 kept the results, in its layout; {} before the test
    _sv_test_results = property(lambda self: {} if self._sv is None else legacy_dict(self._sv))
    _du_test_results = property(lambda self: {} if self._du is None else legacy_dict(self._du))

    def _from_setup(get: Callable[[_setup.SetupRecord], Any], doc: str) -> property:
        return property(lambda self: None if self._setup is None else get(self._setup), doc=doc)

    n_genes = _from_setup(lambda s: s.n_genes, "Number of genes after filtering (None before set-up).")
    n_spots = _from_setup(lambda s: s.n_spots, "Number of spatial spots.")
    n_isos_per_gene = _from_setup(lambda s: list(s.genes.n_isos), "Isoforms per gene.")
    n_factors = _from_setup(lambda s: s.n_factors, "Number of covariates for differential usage testing.")
    gene_names = _from_setup(lambda s: list(s.genes.names), "Display names of the genes.")
    covariate_names = _from_setup(lambda s: s.covariate_names, "Names of the covariates, or None.")
    design_mtx = _from_setup(lambda s: s.design, "Design matrix ``(n_spots, n_factors)`` or None.")
    sp_kernel = _from_setup(lambda s: s.sp_kernel, "Spatial kernel object (None for 'glm' and after load()).")
    del _from_setup

    @property
    def filtered_adata(self):
        """The filtered AnnData of shape ``(n_spots, sum(n_isos_per_gene))``.

        Raises
        ------
        RuntimeError
            If :meth:`setup_data` has not been called.
        """
        if self._setup is None or self._setup.filtered_adata is None:
            raise RuntimeError("No filtered data: call setup_data() first")
        return self._setup.filtered_adata

    def _fitted(self) -> _fit.Fitted | None:
        return None if self._fit is None else _fit.Fitted(self.config, self._setup, self._fit)

    def _require_fit(self) -> _fit.Fitted:
        if self._fit is None:
            raise RuntimeError("The model has not been fitted: call fit() first")
        return self._fitted()

    # ------------------------------------------------------------------ steps
    @fill_doc(setup_parameters=_setup.SETUP_DATA_DOC)
    def setup_data(self, adata, *, spatial_key: str = "spatial", adj_key: str | None = None,
                   layer: str = "counts", group_iso_by: str = "gene_symbol",
                   gene_names: str | None = None, group_gene_by_n_iso: bool = False,
                   design_mtx: Any = None, covariate_names: list[str] | None = None,
                   min_counts: int = 10, min_bin_pct: float = 0.0, min_component_size: int = 1) -> None:
        """Check, filter and store the data; build the design and the spatial kernel.

        {setup_parameters}
        """
        record = _setup.set_up(
            self.config, adata, spatial_key=spatial_key, adj_key=adj_key, layer=layer,
            group_iso_by=group_iso_by, gene_names=gene_names, group_gene_by_n_iso=group_gene_by_n_iso,
            design_mtx=design_mtx, covariate_names=covariate_names, min_counts=min_counts,
            min_bin_pct=min_bin_pct, min_component_size=min_component_size)
        # the previous set-up (and its fits) is replaced only once the new one has succeeded
        self.adata, self._setup = adata, record
        self._summaries = self._score_kernel = None
        self._clear_fit()

    @fill_doc(fit_parameters=_fit.FIT_DOC)
    def fit(self, n_jobs: int = 1, batch_size: int = 1, quiet: bool = True, print_progress: bool = True,
            with_design_mtx: bool = False, from_null: bool = False, refit_null: bool = True,
            random_seed: int | None = None, backend: Literal["loky", "dask"] = "loky") -> None:
        """Fit one model per gene.

        {fit_parameters}
        """
        if self._setup is None:
            raise RuntimeError("call setup_data() before fit()")
        backend = Backend.check("backend", backend)
        n_jobs = 1 if backend == Backend.DASK else _fit.resolve_n_jobs(n_jobs, self.device)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        if batch_size > 1 and not self._setup.grouped:
            warnings.warn(
                # the leading words are those of splisosm 1.2.0, for scripts that filter on them
                "Ignoring batch size argument: genes were not grouped by isoform count; "
                "call setup_data(..., group_gene_by_n_iso=True) to fit genes in batches.",
                UserWarning, stacklevel=2)
            batch_size = 1
        if from_null and self.model_type == ModelType.GLM:
            raise ValueError("from_null=True needs a GLMM model_type ('glmm-full' or 'glmm-null'), not 'glm'")
        if from_null and self.config.fitting_method == "joint_newton":
            raise ValueError("from_null=True fits a null model, which does not support fitting_method='joint_newton'")
        generation = 1 if self._fit is None else self._fit.generation + 1
        record = _fit.fit_all(
            self.config, self._setup, n_jobs=n_jobs, batch_size=batch_size, quiet=quiet,
            print_progress=print_progress, with_design_mtx=with_design_mtx, from_null=from_null,
            refit_null=refit_null, random_seed=random_seed, generation=generation, backend=backend)
        self._clear_fit()
        self._fit = record

    @fill_doc(sv_test=_sv.SV_TEST_DOC)
    def test_spatial_variability(self, method: Literal["llr", "score"] = "llr", use_perm_null: bool = False,
                                 return_results: bool = False, print_progress: bool = True,
                                 n_perms_per_gene: int | None = None, **kwargs: Any) -> dict | None:
        """Test for spatial variability (H0: no spatial variance, ``theta = 0``).

        {sv_test}
        """
        self._sv, self._permutations, self._score_kernel = _sv.sv_test(
            self._fitted(), self.model_type, method, use_perm_null=use_perm_null, n_perms=n_perms_per_gene,
            progress=print_progress, cache=self._permutations, kernel=self._score_kernel, **kwargs)
        return legacy_dict(self._sv) if return_results else None

    @fill_doc(du_test=_du.DU_TEST_DOC)
    def test_differential_usage(self, method: Literal["score", "wald", "marginal-score"] = "score",
                                print_progress: bool = True, return_results: bool = False) -> dict | None:
        """Test each covariate for differential isoform usage, per gene (H0: ``beta_f = 0``).

        {du_test}
        """
        fitted = self._fitted()
        _du.check_method(fitted, self.design_mtx, method)
        self._du = _du.du_test(fitted, method, print_progress)
        return legacy_dict(self._du) if return_results else None

    # ------------------------------------------------------------------ accessors
    def get_fitted_models(self) -> list:
        """The fitted per-gene models in gene order (``[]`` before :meth:`fit`), rebuilt afresh."""
        fitted = self._fitted()
        return [] if fitted is None else [fitted.rebuild_for_user([g]) for g in range(self.n_genes)]

    def get_gene_model(self, gene_name: str):
        """A freshly rebuilt fitted model of the gene named ``gene_name`` (the first of duplicates).

        Raises
        ------
        RuntimeError
            If :meth:`fit` has not been called.
        KeyError
            If ``gene_name`` is not among :attr:`gene_names`.
        """
        fitted = self._require_fit()
        try:
            g = self.gene_names.index(gene_name)
        except ValueError:
            raise KeyError(f"Gene {gene_name!r} not found; known genes start with {self.gene_names[:5]}") from None
        return fitted.rebuild_for_user([g])

    def __getitem__(self, gene_name: str):
        """Same as :meth:`get_gene_model`."""
        return self.get_gene_model(gene_name)

    def get_training_summary(self) -> pd.DataFrame:
        """Per gene (indexed by display name): ``model_type``, ``converged``, ``best_loss``,
        ``best_epoch`` and ``fitting_time_s`` (batch wall time over batch size).

        Raises
        ------
        RuntimeError
            Before :meth:`fit`.
        """
        return self._require_fit().training_summary()

    def get_fitted_ratios_anndata(self, layer_name: str = "fitted_ratios"):
        """Copy of :attr:`filtered_adata` with the fitted isoform ratios as a dense layer.

        Raises
        ------
        RuntimeError
            Before :meth:`fit`, or without a filtered AnnData.
        """
        return self._require_fit().fitted_ratios(layer_name)

    def get_formatted_test_results(self, test_type: Literal["sv", "du"],
                                   with_gene_summary: bool = False) -> pd.DataFrame:
        """Test results as a data frame (see :meth:`SVResult.to_frame <splisosm.results.SVResult.to_frame>`).

        Parameters
        ----------
        test_type
            ``'sv'``: one row per gene; ``'du'``: one row per gene and covariate, gene-major.
            ``converged`` says whether every fit the test reads met the early-stopping rule;
            genes whose fit never reached a finite loss have NaN statistics and p-values.
        with_gene_summary
            Append the gene summary columns of :meth:`extract_feature_summary`.

        Raises
        ------
        ValueError
            Unknown ``test_type`` or the test has not been run.
        """
        if test_type not in ("sv", "du"):
            raise ValueError(f"`test_type` must be 'sv' or 'du', got {test_type!r}")
        result = self._sv if test_type == "sv" else self._du
        if result is None:
            runner = "test_spatial_variability()" if test_type == "sv" else "test_differential_usage()"
            raise ValueError(f"No {test_type} test results: run {runner} first")
        df = result.to_frame()
        if with_gene_summary:
            rows = np.repeat(np.arange(self.n_genes), len(df) // self.n_genes)
            summary = self.extract_feature_summary("gene", print_progress=False).reset_index(drop=True)
            df = pd.concat([df, summary.iloc[rows].reset_index(drop=True)], axis=1)
        return df

    def extract_feature_summary(self, level: Literal["gene", "isoform"] = "gene",
                                print_progress: bool = True) -> pd.DataFrame:
        """Per-gene or per-isoform summary statistics of the filtered data (kept until the next set-up).

        ``'gene'``: ``n_isos``, ``perplexity``, ``pct_bin_on``, ``count_avg``, ``count_std``,
        ``major_ratio_avg``; ``'isoform'``: the ``var`` columns plus ``pct_bin_on``,
        ``count_total``, ``count_avg``, ``count_std``, ``ratio_total``, ``ratio_avg``,
        ``ratio_std``.

        Raises
        ------
        RuntimeError
            Before :meth:`setup_data`.
        ValueError
            Unknown ``level``.
        """
        if self._setup is None or self._setup.filtered_adata is None:
            raise RuntimeError("call setup_data() before extract_feature_summary()")
        if level not in ("gene", "isoform"):
            raise ValueError(f"`level` must be 'gene' or 'isoform', got {level!r}")
        if self._summaries is None:
            self._summaries = feature_summaries(
                self._setup.filtered_adata, layer=self._setup.layer, var_index=self._setup.genes.var_index,
                gene_names=self.gene_names, print_progress=print_progress)
        return self._summaries[0] if level == "gene" else self._summaries[1]

    @fill_doc(write_results=WRITE_RESULTS_DOC)
    def write_results(self, adata: Any = None, *, key_added: str = DEFAULT_KEY):
        """Write the analysis into an AnnData, so that ``write_h5ad`` saves it with the data.

        {write_results}
        """
        if self._setup is None:
            raise RuntimeError("call setup_data() before write_results()")
        return write_analysis(adata, key_added=key_added, config=self.config, setup=self._setup,
                              fitted=self._fitted(), results={"sv": self._sv, "du": self._du})

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Save the model to one file (a zip archive; no pickled code).

        Holds the configuration, the filtered AnnData, per-gene counts, kernel inputs, design,
        fitted parameters with training logs, test results and permutation statistics. The
        source ``adata`` and the kernel object are not saved: after :meth:`load` they are None.
        """

        save_model(SavedModel(config=self.config, setup=self._setup, fit=self._fit, sv=self._sv,
                              du=self._du, permutations=self._permutations), path)

    @staticmethod
    @fill_doc(load_parameters=LOAD_DOC)
    def load(path: str | os.PathLike, map_location: str | None = None) -> SplisosmGLMM:
        """Load a model written by :meth:`save`.

        {load_parameters}
        """
        saved = load_model(path, map_location=map_location)
        with configs_announced():
            model = SplisosmGLMM(**{k: v for k, v in saved.config.to_dict().items() if k != "approx_rank"},
                                 approx_rank=saved.config.approx_rank)
        model._setup, model._fit, model._sv, model._du = saved.setup, saved.fit, saved.sv, saved.du
        model._permutations = saved.permutations
        return model

    # ------------------------------------------------------------------ report
    def __str__(self) -> str:
        rule, sub = "=" * 60, "-" * 60
        avg = None if self.n_isos_per_gene is None else round(float(np.mean(self.n_isos_per_gene)), 2)
        fit = self._fit
        trained = ("not trained" if fit is None else
                   f"trained ({sum(s.converged for s in fit.states[self.model_type])}/{self.n_genes} converged)")
        return "\n".join([
            rule, "SplisosmGLMM", f"  genes: {self.n_genes}   spots: {self.n_spots}   covariates: "
            f"{self.n_factors}   avg isoforms per gene: {avg}", sub, *self.config.describe(), sub,
            f"Fitting: {trained}", f"  method: {self.config.fitting_method}",
            f"  configs: {self.config.fitting_configs}", f"  last fit: {'NA' if fit is None else fit.info()}",
            sub, f"SV test: {_status(self._sv)}", f"DU test: {_status(self._du)}", rule])

    __repr__ = __str__


def _status(result: SVResult | DUResult | None) -> str:
    return "NA" if result is None else f"Completed ({result.method})"

