"""Fitting every gene of an analysis, and the fitted models as the tests read them."""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from splisosm._checks import check_int
from splisosm.config import Backend, Device, FittingMethod, GLMMConfig, ModelType, resolve_fitting_configs
from splisosm.data import _dataset
from splisosm.data._setup import SetupRecord
from splisosm.glmm import _runner
from splisosm.glmm._runner import FitPlan, GeneState
from splisosm.glmm.isomodels import GD_CHAIN_CONFIGS

#: Covariates whose values reach beyond this magnitude are rescaled for fixed-effect fits.
DESIGN_SCALE_LIMIT = 10.0


#: The rest of ``SplisosmGLMM.fit``'s docstring: its arguments, errors and notes.
FIT_DOC = """\
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
backend
    ``'loky'`` (this machine: one process, or ``n_jobs`` worker processes) or ``'dask'``: the
    batches run on the workers of the ``dask.distributed`` client you created (``n_jobs`` is
    then ignored); the kernel goes to each worker once, each batch carries only its counts.
    Results equal those of ``n_jobs=1``. Needs ``pip install 'splisosm[dask]'``.

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


@dataclass(frozen=True, eq=False)
class FitRecord:
    """The outcome of one ``SplisosmGLMM.fit`` call.

    Attributes
    ----------
    states
        Per model type fitted (``'glmm-full'``, ``'glmm-null'``, ``'glm'``), one
        :class:`~splisosm.glmm._runner.GeneState` per gene.
    with_design_mtx, from_null, refit_null, batch_size
        The arguments of the fit that later steps (tests, permutations) repeat or read.
    design_scale
        Per covariate, the divisor applied to it for a fit with the design (None: none).
    generation
        Counts the fits of a model, so that caches tied to a fit can tell them apart.
    """

    states: dict[str, list[GeneState]]
    with_design_mtx: bool
    from_null: bool
    refit_null: bool
    batch_size: int
    design_scale: list[float] | None
    generation: int

    def info(self) -> dict[str, Any]:
        """The fit's arguments as a dict (shown by ``str(model)``)."""
        return {"with_design_mtx": self.with_design_mtx, "from_null": self.from_null,
                "refit_null": self.refit_null, "batch_size": self.batch_size,
                "design_scale": self.design_scale}

    def to_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON-compatible metadata and the fitted parameters by name."""
        tensors: dict[str, torch.Tensor] = {}
        rows: dict[str, list[dict[str, Any]]] = {}
        for key, states in self.states.items():
            rows[key] = []
            for g, s in enumerate(states):
                for name, value in s.params.items():
                    tensors[f"state/{key}/{g}/{name}"] = value
                rows[key].append({"params": list(s.params), "converged": s.converged,
                                  "best_loss": s.best_loss, "best_epoch": s.best_epoch,
                                  "fitting_time": s.fitting_time, "n_isos": s.n_isos})
        meta = {"fit_generation": self.generation, "fit_info": self.info(), "states": rows}
        return meta, tensors

    @classmethod
    def from_dict(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FitRecord:
        """The record :meth:`to_dict` wrote."""
        states = {
            key: [GeneState(params={n: tensors[f"state/{key}/{g}/{n}"] for n in row["params"]},
                            converged=bool(row["converged"]), best_loss=float(row["best_loss"]),
                            best_epoch=int(row["best_epoch"]),
                            fitting_time=float(row["fitting_time"]), n_isos=int(row["n_isos"]))
                  for g, row in enumerate(rows)]
            for key, rows in meta["states"].items()
        }
        info = meta["fit_info"]
        return cls(states=states, with_design_mtx=bool(info["with_design_mtx"]),
                   from_null=bool(info["from_null"]), refit_null=bool(info["refit_null"]),
                   batch_size=int(info["batch_size"]), design_scale=info.get("design_scale"),
                   generation=int(meta["fit_generation"]))


def resolve_n_jobs(n_jobs: Any, device: str) -> int:
    """Worker processes for ``n_jobs`` (negative: counted back from all cores), at most the cores."""
    n_jobs = check_int("n_jobs", n_jobs)
    if n_jobs == 0:
        raise ValueError("`n_jobs` must be a positive int or a negative count back from all cores, not 0")
    cores = available_cores()
    if n_jobs < 0:
        n_jobs = max(1, cores + 1 + int(n_jobs))
    if n_jobs > cores:
        warnings.warn(f"`n_jobs`={n_jobs} is more than the {cores} cores available; using {cores}.",
                      UserWarning, stacklevel=3)
        n_jobs = cores
    if n_jobs > 1 and device != Device.CPU:
        warnings.warn(f"Parallel fitting is only supported on CPU; using one process on {device!r}.",
                      UserWarning, stacklevel=3)
        n_jobs = 1
    return int(n_jobs)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def design_scale(design: torch.Tensor) -> list[float] | None:
    """Per covariate, the divisor applied to its values for a fit with the design.

    Gradient steps on the fixed effects have a fixed size, so a covariate of large magnitude
    (say ``1e10 * x``) throws the fit off in its first step and its Wald statistic with it.
    Columns reaching beyond :data:`DESIGN_SCALE_LIMIT` are divided by their largest magnitude;
    the others (indicators, standardised covariates) keep their values and their fits. None
    when no column needs it. The Wald statistic does not depend on a covariate's scale, and
    fixed effects are reported on the user's scale.
    """
    largest = design.abs().amax(dim=0).double().cpu().numpy()
    scale = np.where(largest > DESIGN_SCALE_LIMIT, largest, 1.0)
    return None if (scale == 1.0).all() else [float(v) for v in scale]


def scaled(design: torch.Tensor, scale: list[float] | None) -> torch.Tensor:
    if scale is None:
        return design
    return design / torch.as_tensor(scale, dtype=design.dtype, device=design.device)


def plan(config: GLMMConfig, *, from_null: bool, refit_null: bool, quiet: bool) -> FitPlan:
    return FitPlan(model_type=config.model_type, model_kwargs=config.model_configs(),
                   from_null=from_null, refit_null=refit_null, quiet=quiet, device=config.device)


def batches(setup: SetupRecord, fit_plan: FitPlan, batch_size: int, n_jobs: int,
            backend: str = Backend.LOKY.value) -> list[list[int]]:
    """Gene batches: the native engine's fits do not depend on the batch, so on one local process
    it takes larger ones (on a cluster the batches are what spreads the work)."""
    n_isos = setup.genes.n_isos
    if setup.grouped and n_jobs == 1 and backend == Backend.LOKY:
        engine_size = _runner.engine_group_size(fit_plan, setup.kernel, setup.n_spots, max(n_isos))
        if engine_size > 1:
            return _dataset.make_batches(n_isos, True, max(batch_size, engine_size),
                                         mix_isoform_counts=True)
    return _dataset.make_batches(n_isos, setup.grouped, batch_size)


def fit_all(config: GLMMConfig, setup: SetupRecord, *, n_jobs: int, batch_size: int, quiet: bool,
            print_progress: bool, with_design_mtx: bool, from_null: bool, refit_null: bool,
            random_seed: int | None, generation: int, backend: str = Backend.LOKY.value) -> FitRecord:
    """Fit every gene (arguments checked by ``SplisosmGLMM.fit``) and say how many converged."""
    if from_null:
        _warn_chain_overrides(config)
    fit_plan = plan(config, from_null=from_null, refit_null=refit_null, quiet=quiet)
    gene_batches = batches(setup, fit_plan, batch_size, n_jobs, backend)
    if print_progress:
        where = ("the Dask cluster" if backend == Backend.DASK else
                 "single core" if n_jobs == 1 else f"{n_jobs} cores")
        print(f"Fitting {setup.n_genes} genes ({config.model_type}) on {where}, batch size {batch_size}",
              file=sys.stderr)
    scale = design_scale(setup.design) if with_design_mtx and setup.n_factors else None
    start = time.perf_counter()
    states = _runner.run_batches(
        fit_plan, setup.genes.counts, scaled(setup.design, scale) if with_design_mtx else None,
        setup.kernel, gene_batches, n_jobs=n_jobs, random_seed=random_seed, progress=print_progress,
        desc="Fitting", backend=backend,
    )
    record = FitRecord(states=states, with_design_mtx=bool(with_design_mtx), from_null=bool(from_null),
                       refit_null=bool(refit_null), batch_size=int(batch_size), design_scale=scale,
                       generation=generation)
    fitted = states.get(config.model_type) or next(iter(states.values()))
    if print_progress or not quiet:
        print(f"Fitting finished in {time.perf_counter() - start:.1f} s; "
              f"{sum(s.converged for s in fitted)} of {len(fitted)} genes converged", file=sys.stderr)
    _warn_unconverged(config, states, setup.n_genes)
    return record


# warnings below are raised from fit_all, called by SplisosmGLMM.fit: the user's line is 4 up
_USER_LEVEL = 4


def _warn_chain_overrides(config: GLMMConfig) -> None:
    """Say which of the user's optimiser settings only the first from-null fit uses."""
    if not config.fitting_method.endswith("_gd"):
        return
    user = config.fitting_configs
    mine = {k: user[k] for k, v in GD_CHAIN_CONFIGS.items() if k in user and user[k] != v}
    if mine:
        warnings.warn(
            f"With from_null=True, fitting_configs {mine} apply to the first white-noise fit "
            f"only; the spatial fit and the refits after it use {GD_CHAIN_CONFIGS} (as "
            "splisosm 1.2.0 does).", UserWarning, stacklevel=_USER_LEVEL)


def _warn_unconverged(config: GLMMConfig, states: dict[str, list[GeneState]], n_genes: int) -> None:
    """One warning for every gene whose fit did not converge, whatever ``quiet`` says."""
    counts = {key: sum(not s.converged for s in fitted) for key, fitted in states.items()}
    if not any(counts.values()):
        return
    if config.model_type == ModelType.GLM:  # the GLM always fits with its own defaults
        configs = resolve_fitting_configs("iwls", None)
    else:
        configs = resolve_fitting_configs(config.fitting_method, config.fitting_configs)
    rule = "relative" if configs["tol_relative"] else "absolute"
    remedy = ("a marginal fit (fitting_method='marginal_newton'), whose Newton steps meet the rule"
              if configs["tol_relative"] else
              "fitting_configs={'tol_relative': True} to judge the loss change relative to the loss")
    per_model = ", ".join(f"{n} of {n_genes} {key} fits" for key, n in counts.items() if n)
    warnings.warn(
        f"{per_model} did not converge (early-stopping rule: loss improvement below the "
        f"{rule} tol={configs['tol']:g} for {configs['patience']} epochs, within "
        f"max_epochs={configs['max_epochs']}). Their test results are flagged "
        "converged=False in get_formatted_test_results() and get_training_summary(); "
        f"consider more max_epochs, or {remedy}.",
        UserWarning, stacklevel=_USER_LEVEL)


@dataclass(frozen=True, eq=False)
class Fitted:
    """A fitted analysis as the tests and accessors read it: per-gene models rebuilt on demand."""

    config: GLMMConfig
    setup: SetupRecord
    fit: FitRecord

    def states(self, key: str) -> list[GeneState]:
        return self.fit.states[key]

    def has(self, *keys: str) -> bool:
        return all(key in self.fit.states for key in keys)

    def design_for_models(self) -> torch.Tensor | None:
        """The design the stored fixed effects belong to (rescaled as in :func:`design_scale`)."""
        if not self.fit.with_design_mtx:
            return None
        return scaled(self.setup.design, self.fit.design_scale)

    def groups(self) -> list[list[int]]:
        """All genes, in groups of one isoform count."""
        return _dataset.same_size_groups(self.setup.genes.n_isos, list(range(self.setup.n_genes)))

    def rebuild(self, key: str, genes: list[int], *, counts: list[torch.Tensor] | None = None,
                design: torch.Tensor | None = None, states: list[GeneState] | None = None):
        """A batch model of ``genes`` (same isoform count) carrying their stored parameters."""
        source = self.states(key) if states is None else states
        return _runner.rebuild_models(
            key, self.config.model_configs(), [source[g] for g in genes],
            self.setup.counts_of(genes, counts).to(self.config.device),
            self.design_for_models() if design is None else design, self.setup.kernel,
            self.config.device,
        )

    def rebuild_for_user(self, genes: list[int]):
        """A rebuilt model on the user's covariate scale (fixed effects divided back)."""
        key, scale = self.config.model_type, self.fit.design_scale
        if scale is None:
            return self.rebuild(key, genes)
        per_unit = torch.as_tensor(scale, dtype=torch.float32)[:, None]
        states = list(self.states(key))
        for g in genes:
            beta = states[g].params["beta"]
            states[g] = replace(states[g], params={**states[g].params, "beta": beta / per_unit.to(beta)})
        return self.rebuild(key, genes, design=self.setup.design, states=states)

    def training_summary(self) -> pd.DataFrame:
        """Per gene (indexed by display name): model type, convergence, best loss and epoch, time."""
        key = self.config.model_type
        states = self.states(key)
        return pd.DataFrame({
            "model_type": [key] * len(states),
            "converged": [s.converged for s in states],
            "best_loss": [s.best_loss for s in states],
            "best_epoch": [s.best_epoch for s in states],
            "fitting_time_s": [s.fitting_time for s in states],
        }, index=pd.Index(self.setup.genes.names, name="gene"))

    def fitted_ratios(self, layer_name: str):
        """A copy of the filtered AnnData with the fitted isoform ratios as a dense layer."""
        if self.setup.filtered_adata is None:
            raise RuntimeError("No filtered data: call setup_data() first")
        out = self.setup.filtered_adata.copy()
        ratios = np.full(out.shape, np.nan, dtype=np.float32)
        for genes in self.groups():
            with torch.no_grad():
                pi = self.rebuild(self.config.model_type, genes).get_isoform_ratio().detach().cpu().numpy()
            for row, g in enumerate(genes):
                ratios[:, self.setup.genes.var_index[g]] = pi[row]
        out.layers[layer_name] = ratios
        return out

    def converged_genes(self, keys: tuple[str, ...], *results: np.ndarray, stacklevel: int = 4) -> np.ndarray:
        """Per gene, whether every fit a test reads converged; NaN results where one never ran.

        A fit that never reached a finite loss (``best_epoch < 0``) still holds its starting
        values, which would give a confident-looking statistic; its rows of ``results`` (numpy
        arrays, written in place) become NaN, with one warning.
        """
        n = self.setup.n_genes
        converged = np.ones(n, dtype=bool)
        unfitted = np.zeros(n, dtype=bool)
        for key in keys:
            converged &= np.array([s.converged for s in self.states(key)], dtype=bool)
            unfitted |= np.array([s.best_epoch < 0 for s in self.states(key)], dtype=bool)
        if unfitted.any():
            for values in results:
                values[unfitted] = np.nan
            names = [self.setup.genes.names[g] for g in np.flatnonzero(unfitted)[:5]]
            warnings.warn(
                f"{int(unfitted.sum())} gene(s) never reached a finite loss while fitting (e.g. "
                f"{names}); their statistics and p-values are NaN.", UserWarning, stacklevel=stacklevel)
        return converged


JOINT_METHODS = (FittingMethod.JOINT_GD.value, FittingMethod.JOINT_NEWTON.value)
