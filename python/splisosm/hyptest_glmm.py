"""GLMM-based hypothesis tests for spatial isoform usage: the :class:`SplisosmGLMM` facade.

The class holds a validated :class:`~splisosm.config.GLMMConfig` and the records of each step:
the set-up (``_setup``), the fit (``_fit``), and the test results (:mod:`splisosm.results`),
computed by ``_sv`` and ``_du``. Saving and loading go through :mod:`splisosm.io.persistence`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from splisosm._checks import check_int
from splisosm.config import APPROX_RANK_AUTO, SETTINGS_DOC, GLMMConfig, ModelType
from splisosm.data import _setup
from splisosm.data.summary import feature_summaries
from splisosm.glmm import _du, _fit, _sv
from splisosm.glmm._fitting import check_device
from splisosm.glmm.isomodels import IsoFullModel, IsoNullNoSpVar
from splisosm.io.persistence import SavedModel, load_model, save_model
from splisosm.results import DUResult, SVResult, legacy_dict

__all__ = ["SplisosmGLMM", "IsoFullModel", "IsoNullNoSpVar"]

_APPROX_RANK_AUTO = APPROX_RANK_AUTO  # the name splisosm 1.2.0 gives the default; scripts import it
_DEFAULTS = GLMMConfig()


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
        if config.model_type == ModelType.GLM and (
                fitting_method != _DEFAULTS.fitting_method
                or config.fitting_configs != _DEFAULTS.fitting_configs):
            warnings.warn("model_type='glm' fits with its own Newton (IWLS) method; `fitting_method` "
                          "and `fitting_configs` are ignored.", UserWarning, stacklevel=2)
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
        """A read-only attribute of the set-up record (None before set-up)."""
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
    def setup_data(self, adata, *, spatial_key: str = "spatial", adj_key: str | None = None,
                   layer: str = "counts", group_iso_by: str = "gene_symbol",
                   gene_names: str | None = None, group_gene_by_n_iso: bool = False,
                   design_mtx: Any = None, covariate_names: list[str] | None = None,
                   min_counts: int = 10, min_bin_pct: float = 0.0, min_component_size: int = 1) -> None:
        """Check, filter and store the data; build the design and the spatial kernel.

        Parameters
        ----------
        adata
            AnnData ``(n_spots, n_isoforms)``: counts in ``adata.layers[layer]``, isoform-to-gene
            map in ``adata.var[group_iso_by]``, coordinates in ``adata.obsm[spatial_key]``.
        spatial_key
            ``adata.obsm`` key of the ``(n_spots, d)`` coordinates.
        adj_key
            ``adata.obsp`` key of a pre-built adjacency; overrides the k-NN graph. Symmetrised
            by averaging (``RuntimeWarning``) when not symmetric.
        layer
            Counts layer (non-negative integer counts, 2-D).
        group_iso_by
            ``adata.var`` column grouping isoforms into genes.
        gene_names
            ``adata.var`` column with display names (default: the ``group_iso_by`` values).
        group_gene_by_n_iso
            Group genes by isoform count so ``fit(batch_size > 1)`` can stack them.
        design_mtx
            Covariates for DU testing: an obs column name or list of names (categorical columns
            one-hot encoded with all levels), or an ``(n_spots, n_factors)`` array, DataFrame,
            sparse matrix or tensor.
        covariate_names
            Names overriding the inferred covariate names.
        min_counts
            Minimum total count of an isoform.
        min_bin_pct
            Minimum fraction (``<= 1``) or percentage (``> 1``) of spots expressing an isoform.
        min_component_size
            Drop spots in spatial graph components smaller than this (``UserWarning``).

        Raises
        ------
        ValueError
            Invalid arguments or data, naming the argument at fault.
        TypeError
            Unsupported ``design_mtx`` type.

        Warns
        -----
        UserWarning
            Genes dropped for having a single isoform; spots removed by the component filter;
            a disconnected spatial graph (glmm-full); duplicate coordinates; near-constant
            covariates; ``approx_rank=None`` above 5000 spots.
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

    def fit(self, n_jobs: int = 1, batch_size: int = 1, quiet: bool = True, print_progress: bool = True,
            with_design_mtx: bool = False, from_null: bool = False, refit_null: bool = True,
            random_seed: int | None = None) -> None:
        """Fit one model per gene.

        Parameters
        ----------
        n_jobs
            Worker processes (negative counts back from the number of cores, ``-1`` = all).
        batch_size
            Genes fitted jointly per batch (needs ``group_gene_by_n_iso=True`` in setup). Each
            gene is fitted on its own objective, so results do not depend on the batch, which
            only bounds memory. With ``fitting_method='joint_gd'`` (Adam or SGD) on one process,
            the compiled engine fits as many genes together as 1 GiB of working memory holds,
            whatever the value given here.
        quiet
            Suppress the per-model fitting messages.
        print_progress
            Show a progress bar over batches on stderr.
        with_design_mtx
            Include the covariates as fixed effects (for the Wald test). Covariates with values
            beyond +-10 are divided by their largest magnitude for the fit; the models returned
            by :meth:`get_gene_model` carry the original design and effects on its scale.
        from_null
            Fit the white-noise null first and start the spatial model from it; stores both
            fits (needed by :meth:`test_spatial_variability`). With a gradient-descent method,
            the user's ``lr``, ``optim`` and ``patience`` apply to that first fit only (a
            warning says so); the later fits use ``lr=0.01``, Adam and ``patience=5``, as in
            splisosm 1.2.0.
        refit_null
            With ``from_null``, refit the null from the full fit and the full from a better
            null, choosing per gene.
        random_seed
            Seed for reproducible fits (each batch gets a seed derived from it).

        Raises
        ------
        ValueError
            ``n_jobs == 0`` or not an int, ``batch_size < 1``, ``from_null`` with ``'glm'`` or
            with ``'joint_newton'``.
        RuntimeError
            Before :meth:`setup_data`.

        Notes
        -----
        Every fit discards the earlier fits (a de-novo fit also the null fits of an earlier
        ``from_null`` run), test results and permutation statistics. A warning counts the genes
        whose fits did not converge, whatever ``quiet`` says.
        """
        if self._setup is None:
            raise RuntimeError("call setup_data() before fit()")
        n_jobs = _fit.resolve_n_jobs(n_jobs, self.device)
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
            refit_null=refit_null, random_seed=random_seed, generation=generation)
        self._clear_fit()
        self._fit = record

    def test_spatial_variability(self, method: Literal["llr", "score"] = "llr", use_perm_null: bool = False,
                                 return_results: bool = False, print_progress: bool = True,
                                 n_perms_per_gene: int | None = None, **kwargs: Any) -> dict | None:
        """Test for spatial variability (H0: no spatial variance, ``theta = 0``).

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
        self._sv, self._permutations, self._score_kernel = _sv.sv_test(
            self._fitted(), self.model_type, method, use_perm_null=use_perm_null, n_perms=n_perms_per_gene,
            progress=print_progress, cache=self._permutations, kernel=self._score_kernel, **kwargs)
        return legacy_dict(self._sv) if return_results else None

    def test_differential_usage(self, method: Literal["score", "wald", "marginal-score"] = "score",
                                print_progress: bool = True, return_results: bool = False) -> dict | None:
        """Test each covariate for differential isoform usage, per gene (H0: ``beta_f = 0``).

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
    def load(path: str | os.PathLike, map_location: str | None = None) -> SplisosmGLMM:
        """Load a model written by :meth:`save`.

        Parameters
        ----------
        path
            File written by :meth:`save`.
        map_location
            ``'cpu'``, ``'cuda'`` or ``'mps'`` (also ``'cuda:0'`` or a ``torch.device``);
            default: the saved device.

        Raises
        ------
        FileNotFoundError, IsADirectoryError
            ``path`` does not exist or is a directory.
        splisosm.io.persistence.DamagedModelError
            (a ``ValueError``) A member that cannot be read or parts that disagree with each
            other; the message names the part at fault.
        ValueError
            Not a model saved by :meth:`save`, another format version, or a device that is not
            available here. Loading never runs code stored in the file.
        """

        saved = load_model(path, map_location=map_location)
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

    def __repr__(self) -> str:
        return self.__str__()


def _status(result: SVResult | DUResult | None) -> str:
    return "NA" if result is None else f"Completed ({result.method})"


SplisosmGLMM.__doc__ = SplisosmGLMM.__doc__.replace("    {settings}", SETTINGS_DOC)
