"""The per-gene multinomial GLM (no random effect), fitted by IWLS, Newton or gradient descent."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from splisosm.config import GLMFittingMethod, resolve_fitting_configs
from splisosm.glmm._base import CountModel, resolve_diagnose
from splisosm.glmm._fitting import (
    make_logger,
    make_optimizer,
    optimizer_step,
    run_training,
)
from splisosm.ops import fixed_effect_info, multinom_terms

__all__ = ["MultinomGLM"]


def _omega(beta: Tensor, bias: Tensor) -> Tensor:
    """Fixed effects flattened isoform-major with the intercept last: ``(G, q (P + 1))``."""
    return torch.cat([beta.transpose(1, 2), bias[..., None]], dim=-1).flatten(1)


def _split_omega(omega: Tensor, P: int, q: int) -> tuple[Tensor, Tensor]:
    w = omega.reshape(omega.shape[0], q, P + 1)
    return w[..., :P].transpose(1, 2), w[..., P]


def _ridge_solve(A: Tensor, b: Tensor) -> Tensor:
    """``(A + 1e-5 I)^-1 b`` in float64, returned in ``b``'s dtype.

    A design that one-hot encodes every level of a factor is collinear with the intercept
    (categorical obs columns keep all their levels), so only the 1e-5 ridge makes the
    information invertible; in float32 that is below round-off and the solve fails as singular.
    """
    eye = torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
    return torch.linalg.solve(A.double() + 1e-5 * eye, b.double()).to(b.dtype)


def _fixed_effect_newton(X: Tensor, W: Tensor, grad: Tensor) -> Tensor:
    """Newton direction for the fixed effects, ``(X~^T W X~ + 1e-5 I)^-1 X~^T r``."""
    info, score = fixed_effect_info(X, W, grad)
    return _ridge_solve(info, score)


class MultinomGLM(CountModel):
    """Multinomial GLM ``eta = X beta + 1 bias^T``, the reference isoform at logit 0.

    Parameters
    ----------
    fitting_method
        ``'iwls'`` (default), ``'newton'`` or ``'gd'``.
    fitting_configs
        Overrides of ``lr, optim, tol, tol_relative, max_epochs, patience``.
    dtype
        Parameter dtype (float32 by default; float64 for tests).
    """

    _title = "A Multinomial Generalized Linear Model (GLM)"

    def __init__(self, fitting_method: str = "iwls", fitting_configs: dict | None = None, *,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dtype)
        self.fitting_method = GLMFittingMethod.check("fitting_method", fitting_method)
        self.fitting_configs = resolve_fitting_configs(fitting_method, fitting_configs)

    def setup_data(self, counts, design_mtx=None, device: str = "cpu") -> None:
        """Attach counts ``(G, n, m)`` or ``(n, m)`` and an optional design ``(n, P)``."""
        self._set_data(counts, design_mtx, device)
        G, q, P = self.n_genes, self.n_isos - 1, self.n_factors
        opts = {"dtype": self.dtype, "device": self.device}
        self.beta = nn.Parameter(torch.zeros(G, P, q, **opts))
        self.bias_eta = nn.Parameter(torch.zeros(G, q, **opts))

    def _eta(self) -> Tensor:
        return self._fixed_eta()

    def forward(self) -> Tensor:
        """Per-gene multinomial log-likelihood ``(G,)``."""
        return multinom_terms(self._eta(), self.counts)[0]

    def clone(self) -> MultinomGLM:
        new = MultinomGLM(self.fitting_method, dict(self.fitting_configs), dtype=self.dtype)
        new.setup_data(self.counts, self.X, self.device.type)
        new.load_state_dict(self.state_dict())
        return new

    def _newton_epoch(self, active: Tensor, scale: float, iwls: bool) -> None:
        with torch.no_grad():
            eta = self._eta()
            _, grad, W = multinom_terms(eta, self.counts)
            omega = _omega(self.beta, self.bias_eta)
            if iwls:
                y_work = eta + _ridge_solve(W, grad.unsqueeze(-1))[..., 0]
                info, rhs = fixed_effect_info(self.X, W, torch.einsum("gsjk,gsk->gsj", W, y_work))
                new = _ridge_solve(info, rhs)
            else:
                new = omega + scale * _fixed_effect_newton(self.X, W, grad)
            new = torch.where(active[:, None], new, omega)
            beta, bias = _split_omega(new, self.n_factors, self.n_isos - 1)
            self.beta.copy_(beta)
            self.bias_eta.copy_(bias)

    def fit(self, store_param_history: bool = False, verbose: bool = False, quiet: bool = False,
            random_seed: int | None = None, diagnose: bool | None = None):
        """Fit by IWLS, Newton or gradient descent with per-gene early stopping.

        Updates touch only the genes not yet converged; the loss is ``-l_mult`` per gene.
        """
        store_param_history = resolve_diagnose(store_param_history, diagnose)
        if random_seed is not None:
            torch.manual_seed(random_seed)
        params = dict(self.named_parameters())
        logger = make_logger(params, self.fitting_configs)
        fused = self.fitting_method == "gd"
        if fused:
            optimizer = make_optimizer(list(params.values()), self.fitting_configs)

            def step(epoch: int, active: Tensor, record) -> bool:
                # summed over the genes still active once this epoch's loss has been logged
                return optimizer_step(
                    optimizer, lambda: -self.forward(), record,
                    reduce=lambda loss: (loss * (~logger.stopped).to(loss.dtype)).sum())
        else:
            def step(epoch: int, active: Tensor) -> None:
                self._newton_epoch(active, 0.9, self.fitting_method == "iwls")

        result = run_training(params, lambda: -self.forward(), step, self.fitting_configs,
                              fused=fused, store_param_history=store_param_history,
                              verbose=verbose, quiet=quiet, logger=logger)
        return self._fit_report(result, store_param_history)


