"""The per-gene multinomial GLMM (spatial or white-noise random effect) and how it is fitted.

Both are batched over ``G`` genes with the same isoform count; the last isoform of each gene is
the reference category. The multinomial pieces come from the fused ops in :mod:`splisosm.ops`;
the Gaussian random-effect pieces (quadratic form, log-determinants, structured solves) from a
``LaplaceSystem`` (eigenbasis, low rank, sparse precision or identity).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splisosm.config import configs_announced, resolve_prior_params, validate_glmm_config, warn_unused_fitting_keys
from splisosm.glmm._base import CountModel, as_tensor, resolve_diagnose
from splisosm.glmm._fitting import (
    FitResult,
    logger_from_outcome,
    make_optimizer,
    optimizer_step,
    report_fit,
    run_training,
)
from splisosm.glmm._likelihood import (
    LOW_VARIANCE_WARNING,
    MAX_THETA,
    MIN_VARIANCE,
    GuardedSystem,
    gaussian_loglik,
    log_prior,
    variance_components,
)
from splisosm.glmm._newton import JointNewton, MarginalNewton
from splisosm.glmm.laplace import LaplaceSystem, symmetric_precision
from splisosm.ops import multinom_terms
from splisosm.ops.engine import engine_runs, joint_gd_fit

__all__ = ["MultinomGLMM"]

MARGINAL_METHODS = ("marginal_gd", "marginal_newton")
DENSE_MARGINAL_WARN_N = 300


class MultinomGLMM(CountModel):
    """Multinomial GLMM with a spatial Gaussian random effect per isoform.

    ``eta = nu + X beta + 1 bias^T``; column ``j`` of ``nu`` has prior covariance
    ``Sigma_j = v (theta K + (1 - theta) I)`` with ``v = max(sigma^2, 0.01)`` and
    ``theta = sigmoid(theta_logit)``.

    Parameters
    ----------
    share_variance
        One variance component for all isoforms (``C = 1``) or one per isoform (``C = q``).
    var_fix_sigma
        Keep ``sigma`` at its Fano initial value (only ``theta_logit`` is learned).
    var_prior_model, var_prior_model_params
        ``'none'``, ``'gamma'`` or ``'inv_gamma'``; parameters merged over the documented
        defaults (gamma ``alpha=2, beta=0.3``; inverse gamma ``alpha=3, beta=0.5``).
    init_ratio
        ``'uniform'`` (all ratios equal) or ``'observed'`` (the intercept at the gene's pooled
        log-ratios, with 0.5 added to each count; the random effect starts at 0 either way).
    fitting_method
        ``'joint_gd'``, ``'joint_newton'``, ``'marginal_gd'`` or ``'marginal_newton'``.
    fitting_configs
        Overrides of the method's defaults (base ``lr=1e-2, optim='adam', tol=1e-5,
        max_epochs=1000, patience=5``, then per method, then these); validated here, at
        construction.
    dtype
        Parameter dtype (float32 by default; float64 for tests).
    """

    _title = "A Multinomial Generalized Linear Mixed Model (GLMM)"
    _null_model = False

    def __init__(self, share_variance: bool = True, var_fix_sigma: bool = True,
                 var_prior_model: str = "none", var_prior_model_params: dict | None = None,
                 init_ratio: str = "uniform", fitting_method: str = "joint_gd",
                 fitting_configs: dict | None = None, *, dtype: torch.dtype = torch.float32
                 ) -> None:
        super().__init__(dtype)
        self.fitting_configs = validate_glmm_config(
            fitting_method=fitting_method, init_ratio=init_ratio,
            var_prior_model=var_prior_model, var_fix_sigma=var_fix_sigma,
            fitting_configs=fitting_configs, null_model=self._null_model)
        warn_unused_fitting_keys(fitting_method, fitting_configs, stacklevel=2)
        self.share_variance = bool(share_variance)
        self.var_fix_sigma = bool(var_fix_sigma)
        self.var_prior_model = var_prior_model
        self.var_prior_model_params = resolve_prior_params(var_prior_model,
                                                           var_prior_model_params)
        self.init_ratio = init_ratio
        self.fitting_method = fitting_method
        self._user_fitting_configs = dict(fitting_configs or {})
        self.corr_sp_eigvals = self.corr_sp_eigvecs = self.corr_sp_precision = None
        self._pairs_given = None

    # ----------------------------------------------------------------- data and parameters
    def setup_data(self, counts, corr_sp=None, design_mtx=None, device: str = "cpu",
                   corr_sp_eigvals=None, corr_sp_eigvecs=None, corr_sp_precision=None) -> None:
        """Attach counts, design and the spatial covariance; initialise the parameters.

        The covariance is a dense ``corr_sp`` (eigendecomposed here, full rank), eigenpairs
        ``corr_sp_eigvals (r,)`` / ``corr_sp_eigvecs (n, r)``, or (extension) a scipy sparse
        ``corr_sp_precision`` ``K^-1`` for the exact sparse route.
        """
        self._set_data(counts, design_mtx, device)
        self._set_spatial(corr_sp, corr_sp_eigvals, corr_sp_eigvecs, corr_sp_precision)
        self._init_params()
        if (self.fitting_method == "marginal_gd" and self.n_spots > DENSE_MARGINAL_WARN_N
                and self.system.route == "eigen" and self.system.rank == self.n_spots):
            warnings.warn(
                "marginal_gd with a full-rank kernel but no sparse precision differentiates a "
                f"dense (nq x nq) log-determinant; n = {self.n_spots} > {DENSE_MARGINAL_WARN_N} "
                "makes this slow (pass corr_sp_precision as well, or use approximate eigenpairs).",
                UserWarning, stacklevel=2)

    def _set_spatial(self, corr_sp, eigvals, eigvecs, precision) -> None:
        n = self.n_spots
        if precision is not None:
            precision = symmetric_precision(precision, n, "corr_sp_precision")
        if corr_sp is not None:
            if eigvals is not None or eigvecs is not None:
                warnings.warn("Both corr_sp and its eigenpairs were given; the eigenpairs are "
                              "ignored.", UserWarning, stacklevel=3)
            K = as_tensor(corr_sp, torch.float64, torch.device("cpu"), "corr_sp")
            if K.shape != (n, n):
                raise ValueError(f"`corr_sp` must be ({n}, {n}), got {tuple(K.shape)}")
            lam, vec = torch.linalg.eigh((K + K.T) / 2)
            eigvals, eigvecs = lam.flip(0), vec.flip(1)
        self._pairs_given = None
        if eigvals is not None or eigvecs is not None:
            if eigvals is None or eigvecs is None:
                raise ValueError("Both corr_sp_eigvals and corr_sp_eigvecs are required.")
            # The Laplace system works in float64 on the CPU: built from the pairs as given
            # (typically one float64 array shared by every model of a dataset), it needs no
            # float64 copy of its own per model.
            self._pairs_given = (eigvals, eigvecs)
            eigvals = as_tensor(eigvals, self.dtype, self.device, "corr_sp_eigvals").reshape(-1)
            eigvecs = as_tensor(eigvecs, self.dtype, self.device, "corr_sp_eigvecs")
            if eigvecs.dim() != 2 or eigvecs.shape != (n, eigvals.shape[0]):
                raise ValueError(f"`corr_sp_eigvecs` must be ({n}, {eigvals.shape[0]}) to match "
                                 f"the eigenvalues, got {tuple(eigvecs.shape)}")
            self.corr_sp_eigvals, self.corr_sp_eigvecs = eigvals, eigvecs
            self.corr_sp_precision = precision
        elif precision is not None:
            self.corr_sp_eigvals = self.corr_sp_eigvecs = None
            self.corr_sp_precision = precision
        else:
            raise ValueError("A spatial covariance is required: pass corr_sp, both "
                             "corr_sp_eigvals and corr_sp_eigvecs, or corr_sp_precision.")
        self._system = None

    @property
    def system(self):
        """The structured Laplace system for this model's spatial covariance."""
        if self._system is None:
            self._system = GuardedSystem(self._build_system(LaplaceSystem))
        return self._system

    def _build_system(self, cls):
        evals = evecs = None
        if self._pairs_given is not None:
            cpu = torch.device("cpu")
            evals = as_tensor(self._pairs_given[0], torch.float64, cpu, "corr_sp_eigvals")
            evecs = as_tensor(self._pairs_given[1], torch.float64, cpu, "corr_sp_eigvecs")
        return cls(self.n_spots, evals=None if evals is None else evals.reshape(-1), evecs=evecs,
                   precision=self.corr_sp_precision)

    def _init_params(self) -> None:
        G, n, m = self.counts.shape
        q, P = m - 1, self.n_factors
        C = 1 if self.share_variance else q
        opts = {"dtype": self.dtype, "device": self.device}
        Y = self.counts
        nu = torch.zeros(G, n, q, **opts)
        bias = torch.zeros(G, q, **opts)
        if self.init_ratio == "observed":
            # The gene's pooled ratios start the intercept; the random effect starts at 0. Spot
            # log-ratios as its start (splisosm 1.2.0) put every zero count near +-11.5, which
            # 500 Adam epochs of step ~lr cannot undo: the random effect then still mirrors the
            # spots' own ratios, the residuals shrink, and the DU score test loses its power.
            pooled = Y.sum(1)
            bias = torch.log((pooled[:, :q] + 0.5) / (pooled[:, q:] + 0.5)).to(**opts)
        var = Y.var(dim=1) if n > 1 else torch.zeros(G, m, **opts)
        fano = var.mean(-1) / Y.sum(-1).mean(-1).clamp(min=1.0)
        sigma = fano.clamp(1e-4, 0.9).sqrt()[:, None].expand(G, C)
        self.nu = nn.Parameter(nu.contiguous())
        self.beta = nn.Parameter(torch.zeros(G, P, q, **opts))
        self.bias_eta = nn.Parameter(bias.contiguous())
        self.sigma = nn.Parameter(sigma.contiguous(), requires_grad=not self.var_fix_sigma)
        self.theta_logit = nn.Parameter(torch.full((G, C), -3.0, **opts))
        self._freeze_null()

    def _freeze_null(self) -> None:
        """Hook for null models (theta pinned at zero)."""

    # ----------------------------------------------------------------------- likelihoods
    def _eta(self) -> Tensor:
        return self.nu + self._fixed_eta()

    def _variance(self, warn: bool = True) -> tuple[Tensor, Tensor]:
        return variance_components(self.sigma, self.theta_logit, self.n_isos - 1, warn=warn)

    def _log_prior(self) -> Tensor:
        return log_prior(self.sigma, self.var_prior_model, self.var_prior_model_params)

    def _joint_parts(self, nu: Tensor | None = None) -> dict[str, Tensor]:
        """Joint log-likelihood and its multinomial/Gaussian pieces at ``nu``."""
        nu = self.nu if nu is None else nu
        eta = nu + self._fixed_eta()
        l_mult, grad, W = multinom_terms(eta, self.counts)
        v, theta = self._variance()
        quad, logdet_sigma, _ = self.system.prior_terms(nu, v, theta, with_precision=False)
        l_mvn = gaussian_loglik(quad, logdet_sigma, self.n_spots, self.n_isos - 1)
        l_joint = l_mult + l_mvn + self._log_prior()
        return {"joint": l_joint, "grad": grad, "W": W, "v": v, "theta": theta}

    def joint_loglik(self) -> Tensor:
        """Per-gene joint log-likelihood ``l_J = l_mult + sum_j l_MVN(nu_j) + l_prior`` ``(G,)``."""
        return self._joint_parts()["joint"]

    def marginal_loglik(self) -> Tensor:
        """Per-gene Laplace marginal ``l_J - 1/2 log det(Sigma^-1 + W)`` at the current ``nu``.

        Differentiable when gradients are enabled (the structured log-determinant gradients of
        :meth:`splisosm.glmm.laplace.LaplaceSystem.logdet`).
        """
        parts = self._joint_parts()
        # float64 curvature: float32 blocks of spots with extreme probabilities can be
        # numerically indefinite
        W = parts["W"]
        if W.dtype != torch.float64:
            W = multinom_terms(self._eta().to(torch.float64), self.counts.to(torch.float64))[2]
        v, theta = parts["v"].to(torch.float64), parts["theta"].to(torch.float64)
        return parts["joint"] - 0.5 * self.system.logdet(W, v, theta).to(parts["joint"].dtype)

    def forward(self) -> Tensor:
        """Laplace marginal ``l_M`` for marginal methods, joint ``l_J`` otherwise ``(G,)``."""
        if self.fitting_method in MARGINAL_METHODS:
            return self.marginal_loglik()
        return self.joint_loglik()

    # ---------------------------------------------------------------------------- fitting
    def fit(self, store_param_history: bool = False, verbose: bool = False, quiet: bool = False,
            random_seed: int | None = None, diagnose: bool | None = None):
        """Fit with the configured method and per-gene early stopping.

        Each gene keeps the parameters of its best epoch and converges once ``patience`` epochs
        in a row bring no improvement of at least ``tol`` (relative with ``tol_relative``).

        Returns ``{'loss': (epochs, G), 'params': [...]}`` when history is requested.
        """
        store_param_history = resolve_diagnose(store_param_history, diagnose)
        method = self.fitting_method
        if random_seed is not None:
            torch.manual_seed(random_seed)
        if method == "joint_gd" and not (store_param_history or verbose) and self._use_engine():
            _fit_native([self], quiet)
            return None
        params = dict(self.named_parameters())
        fused = method in ("joint_gd", "marginal_gd")
        if fused:
            optimizer = make_optimizer(list(params.values()), self.fitting_configs)
            # Each gene descends its own objective (a sum, not a batch mean), so a gene's fit
            # does not depend on its batch-mates; L-BFGS couples them through its line search.
            reduce = None if self.fitting_configs["optim"] == "lbfgs" else torch.sum

            def step(epoch: int, active: Tensor, record) -> bool:
                return optimizer_step(optimizer, lambda: -self.forward(), record, reduce)
        elif method == "joint_newton":
            step = JointNewton(self).step
        else:
            fitter = MarginalNewton(self)
            step = fitter.step

            def loss() -> Tensor:  # the step already evaluated l_M at the new state
                return -fitter.objective
        if method != "marginal_newton":
            def loss() -> Tensor:
                return -self.forward()
        result = run_training(params, loss, step, self.fitting_configs, fused=fused,
                              store_param_history=store_param_history, verbose=verbose,
                              quiet=quiet, positive_params=("sigma",))
        return self._fit_report(result, store_param_history)

    def _use_engine(self) -> bool:
        """Whether the native engine can run this model's ``joint_gd`` fit: Adam or SGD, a
        kernel given by eigenpairs (or a null model), and a device with the compiled op."""
        null = not self.theta_logit.requires_grad
        return engine_runs(self.fitting_method, self.fitting_configs["optim"],
                           null or self.corr_sp_eigvecs is not None, self.device)

    def _engine_settings(self) -> dict[str, Any]:
        """The settings of this model's fit, as :func:`splisosm.ops.engine.joint_gd_fit` takes
        them (models with equal settings can share one engine call)."""
        return {"train_sigma": not self.var_fix_sigma,
                "train_theta": self.theta_logit.requires_grad,
                "prior": self.var_prior_model,
                "prior_params": dict(self.var_prior_model_params),
                "min_variance": MIN_VARIANCE, "max_theta": MAX_THETA,
                "configs": dict(self.fitting_configs)}

    def _engine_kernel(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues and eigenvectors of the prior, none (``r = 0``) for a null model."""
        if not self.theta_logit.requires_grad:
            return self.counts.new_zeros(0), self.counts.new_zeros(self.n_spots, 0)
        return self.corr_sp_eigvals, self.corr_sp_eigvecs

    # ------------------------------------------------------------------------- utilities
    def _config_kwargs(self) -> dict:
        return {"share_variance": self.share_variance, "var_fix_sigma": self.var_fix_sigma,
                "var_prior_model": self.var_prior_model,
                "var_prior_model_params": dict(self.var_prior_model_params),
                "init_ratio": self.init_ratio, "fitting_method": self.fitting_method,
                "fitting_configs": dict(self._user_fitting_configs), "dtype": self.dtype}

    def _copy_data_from(self, other: MultinomGLMM) -> None:
        """Share ``other``'s counts, design and spatial inputs and copy its parameters."""
        self.device = other.device
        self.counts, self.X = other.counts, other.X
        self.n_genes, self.n_spots, self.n_isos = other.n_genes, other.n_spots, other.n_isos
        self.n_factors = other.n_factors
        self.corr_sp_eigvals, self.corr_sp_eigvecs = other.corr_sp_eigvals, other.corr_sp_eigvecs
        self._pairs_given = other._pairs_given
        self.corr_sp_precision = other.corr_sp_precision
        self._system = other.system
        self._init_params()
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(getattr(other, name).detach())

    def clone(self) -> MultinomGLMM:
        """Same configuration, data, spatial inputs and parameters (no fit state)."""
        new = recreate_model(type(self), self._config_kwargs())
        new._copy_data_from(self)
        return new

    def _description(self) -> list[str]:
        return [
            f"- Variance: learnable {not self.var_fix_sigma}, shared across isoforms "
            f"{self.share_variance}, prior {self.var_prior_model}",
            f"- Initial ratios: {self.init_ratio}",
        ]


def recreate_model(cls: type[MultinomGLMM], kwargs: dict[str, Any]) -> MultinomGLMM:
    """A model of ``cls`` built from settings its user gave before, without repeating the
    warning about fitting configs that have no effect (it was shown when they were given)."""
    with configs_announced():
        return cls(**kwargs)


def fit_together(models: Sequence[MultinomGLMM], *, quiet: bool = True,
                 random_seed: int | None = None) -> None:
    """Fit several models set up with the same design and spatial kernel (one model per isoform
    count, say), each by its own configuration.

    Where the native engine runs all of them with equal settings, they share one engine call, in
    which each product with the kernel's eigenvectors covers the genes of every model; a gene's
    fit is the same as in a call of its own. Otherwise each model is fitted in turn.
    """
    if len(models) > 1 and all(m._use_engine() for m in models):
        settings = models[0]._engine_settings()
        if all(m._engine_settings() == settings for m in models[1:]):
            _fit_native(models, quiet)
            return
    for model in models:
        model.fit(quiet=quiet, random_seed=random_seed)


def _fit_native(models: Sequence[MultinomGLMM], quiet: bool) -> None:
    """One engine call for ``models`` (equal engine settings, shared design and kernel)."""
    first = models[0]
    evals, evecs = first._engine_kernel()
    params = [{name: p.detach() for name, p in m.named_parameters()} for m in models]
    start = time.perf_counter()
    fits, low_variance = joint_gd_fit([m.counts for m in models], first.X, evals, evecs, params,
                                      **first._engine_settings())
    fitting_time = time.perf_counter() - start
    if low_variance:
        warnings.warn(LOW_VARIANCE_WARNING, UserWarning, stacklevel=3)
    n_bad = sum(int((~torch.isfinite(fit.loss_history)).any(0).sum()) for fit in fits)
    if n_bad:
        warnings.warn(f"Non-finite loss for {n_bad} gene(s) during the fit.", UserWarning,
                      stacklevel=3)
    n_genes = sum(m.n_genes for m in models)
    for model, fit in zip(models, fits):
        with torch.no_grad():
            for name, value in fit.params.items():
                getattr(model, name).copy_(value)
        logger = logger_from_outcome(model.fitting_configs, fit.loss_history, fit.best_loss,
                                     fit.best_epoch, fit.converged)
        share = fitting_time * model.n_genes / n_genes
        if not quiet:
            report_fit(logger, share)
        model._fit_report(FitResult(logger, share), False)
