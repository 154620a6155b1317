"""The full (spatial variance free) and null (spatial variance pinned at zero) GLMMs and the
conversions between them used by ``from_null`` fitting (fit the null model, then start the full
model from it).

Deviation from splisosm 1.2.0, deliberate: 1.2.0 switched every Newton method to its
gradient-descent counterpart on conversion. Our Newton methods are correct, so a conversion keeps
``marginal_newton``, and keeps ``joint_newton`` for null -> full; full -> null with
``joint_newton`` becomes ``joint_gd`` because a null model cannot use ``joint_newton``. The
``lr=0.01, optim='adam', patience=5`` overwrite applies only when the resulting method is a
gradient-descent method.
"""

from __future__ import annotations

import torch

from splisosm.glmm.model import MultinomGLMM, recreate_model

__all__ = ["IsoFullModel", "IsoNullNoSpVar"]

#: Settings of every gradient-descent fit after the first in a from-null chain (as in 1.2.0).
GD_CHAIN_CONFIGS = {"lr": 0.01, "optim": "adam", "patience": 5}


def _converted_kwargs(source: MultinomGLMM, method: str) -> dict:
    kwargs = source._config_kwargs()
    configs = dict(kwargs["fitting_configs"])
    if method.endswith("_gd"):
        configs.update(GD_CHAIN_CONFIGS)
    kwargs.update(fitting_method=method, fitting_configs=configs)
    return kwargs


class IsoFullModel(MultinomGLMM):
    """GLMM whose spatial proportion ``theta`` is learned."""

    @classmethod
    def from_trained_null(cls, null: MultinomGLMM) -> IsoFullModel:
        """Start a full model from a fitted null model.

        Parameters, counts, design and spatial inputs are carried over and ``theta_logit`` is
        set to -3 (trainable). A learned ``sigma`` (``var_fix_sigma=False``) restarts from the
        random effect's spread (``max_j std_s nu_sj`` when shared, per isoform otherwise,
        clamped below at 0.1). A fixed ``sigma`` keeps the null model's value: the full model is
        then the very model a direct fit would use, so its fit, and the tests built on it, do
        not depend on whether it was reached from the null. (splisosm 1.2.0 re-initialised a
        fixed ``sigma`` too, which froze the full model at a different total variance than the
        null model and than a direct fit.)
        """
        full = recreate_model(cls, _converted_kwargs(null, null.fitting_method))
        full._copy_data_from(null)
        with torch.no_grad():
            if not full.var_fix_sigma:
                spread = (full.nu.std(dim=1) if full.n_spots > 1
                          else torch.zeros_like(full.nu[:, 0]))
                spread = spread.amax(-1, keepdim=True) if full.share_variance else spread
                full.sigma.copy_(spread.clamp(min=0.1))
            full.theta_logit.fill_(-3.0)
        return full

    # splisosm 1.2.0 spelling, kept so scripts written for it run unchanged
    from_trained_null_no_sp_var_model = from_trained_null


class IsoNullNoSpVar(MultinomGLMM):
    """GLMM without spatial variance: ``theta_logit = -inf`` (frozen), so ``Sigma = v I``."""

    _null_model = True

    def _freeze_null(self) -> None:
        with torch.no_grad():
            self.theta_logit.fill_(-float("inf"))
        self.theta_logit.requires_grad_(False)

    @classmethod
    def from_trained_full(cls, full: MultinomGLMM) -> IsoNullNoSpVar:
        """Start a null model from a fitted full model (all parameters but ``theta`` kept)."""
        method = "joint_gd" if full.fitting_method == "joint_newton" else full.fitting_method
        null = recreate_model(cls, _converted_kwargs(full, method))
        null._copy_data_from(full)
        null._freeze_null()
        return null

    # splisosm 1.2.0 spelling, kept so scripts written for it run unchanged
    from_trained_full_model = from_trained_full
