"""The native fitting engine: whole ``joint_gd`` fits of a batch of genes in one op call.

It runs on the CPU and, in a build with the CUDA kernels, on the GPU (every epoch on the device,
float32 or float64 as the model's dtype). The Python fitter in :mod:`splisosm.model` (autograd +
``torch.optim``) computes the same trajectories and stays the reference the engine is tested
against; the GPU engine is tested against the CPU engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from splisosm.ops._native import NATIVE_AVAILABLE, has_native_kernel

#: Optimisers the engine implements (L-BFGS stays with the Python fitter).
ENGINE_OPTIMIZERS = ("adam", "sgd")


@dataclass
class EngineFit:
    """What :func:`joint_gd_fit` returns.

    Attributes
    ----------
    params
        Best parameters per gene: ``nu, beta, bias_eta, sigma`` (absolute value), ``theta_logit``.
    loss_history
        ``(epochs, G)`` float64 losses as logged after each epoch (non-finite shown as +inf).
    best_loss, best_epoch, converged
        ``(G,)`` per-gene early-stopping outcome.
    low_variance
        Whether any ``sigma^2`` fell below the variance floor during the fit.
    """

    params: dict[str, Tensor]
    loss_history: Tensor
    best_loss: Tensor
    best_epoch: Tensor
    converged: Tensor
    low_variance: bool


def engine_available(device: torch.device) -> bool:
    """Whether the compiled engine can fit on ``device``."""
    return has_native_kernel("joint_gd_fit", device)


def engine_runs(method: str, optim: str, has_eigenpairs: bool, device: torch.device) -> bool:
    """Whether a fit goes to the engine: ``joint_gd`` with Adam or SGD, a kernel given by
    eigenpairs (or no spatial kernel at all: a null model), on a device with the compiled op."""
    return (method == "joint_gd" and optim in ENGINE_OPTIMIZERS and has_eigenpairs
            and engine_available(device))


def joint_gd_fit(
    counts: Tensor,
    X: Tensor,
    evals: Tensor,
    evecs: Tensor,
    params: dict[str, Tensor],
    *,
    train_sigma: bool,
    train_theta: bool,
    prior: str,
    prior_params: dict[str, float],
    min_variance: float,
    max_theta: float,
    configs: dict,
) -> EngineFit:
    """Fit ``G`` genes by gradient descent on the joint log-likelihood, natively.

    Parameters
    ----------
    counts
        ``(G, n, m)`` isoform counts.
    X
        ``(n, P)`` design (``P`` may be 0).
    evals, evecs
        ``(r,)`` and ``(n, r)`` kernel eigenpairs; ``r = 0`` for a white-noise prior.
    params
        Starting values ``nu, beta, bias_eta, sigma, theta_logit``; not modified.
    train_sigma, train_theta
        Whether ``sigma`` / ``theta_logit`` are optimised (otherwise held fixed).
    prior, prior_params
        Variance prior ``'none'``, ``'gamma'`` or ``'inv_gamma'`` and its ``alpha``, ``beta``.
    min_variance, max_theta
        Floor of ``sigma^2`` and cap of ``sigmoid(theta_logit)``.
    configs
        Resolved fitting configuration: ``optim`` (``'adam'`` or ``'sgd'``), ``lr``, ``tol``,
        ``tol_relative``, ``patience``, ``max_epochs``.
    """
    out = torch.ops.splisosm.joint_gd_fit(
        counts, X, evals, evecs, params["nu"], params["beta"], params["bias_eta"],
        params["sigma"], params["theta_logit"], bool(train_sigma), bool(train_theta), prior,
        float(prior_params.get("alpha", 0.0)), float(prior_params.get("beta", 0.0)),
        float(min_variance), float(max_theta), configs["optim"], float(configs["lr"]),
        float(configs["tol"]), bool(configs.get("tol_relative", False)),
        int(configs["patience"]), int(configs["max_epochs"]),
    )
    names = ("nu", "beta", "bias_eta", "sigma", "theta_logit")
    return EngineFit(dict(zip(names, out[:5])), out[5], out[6], out[7], out[8], bool(out[9]))


def panel_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in float32 through the engine's packed-panel product (CPUs with AVX2 and FMA).

    The engine packs the kernel's eigenvectors once per fit and multiplies them by the changing
    random effects twice per epoch; this op packs ``b`` on every call and exists so that the
    product can be checked against ``a @ b`` on its own.
    """
    return torch.ops.splisosm.panel_matmul(a, b)


def panel_matmul_available() -> bool:
    """Whether this CPU runs the packed-panel product (float32 engine fits use it when so)."""
    if not has_native_kernel("panel_matmul", torch.device("cpu")):
        return False
    try:
        torch.ops.splisosm.panel_matmul(torch.zeros(1, 1), torch.zeros(1, 1))
    except RuntimeError:
        return False
    return True


if NATIVE_AVAILABLE:

    @torch.library.register_fake("splisosm::panel_matmul")
    def _(a, b):
        torch._check(a.dim() == 2 and b.dim() == 2, lambda: "panel_matmul takes 2-D a and b")
        torch._check(a.shape[1] == b.shape[0], lambda: "b must have a.shape[1] rows")
        return a.new_empty((a.shape[0], b.shape[1]))

    @torch.library.register_fake("splisosm::joint_gd_fit")
    def _(counts, X, evals, evecs, nu, beta, bias, sigma, theta_logit, train_sigma, train_theta,
          prior, prior_alpha, prior_beta, min_variance, max_theta, optim, lr, tol, tol_relative,
          patience, max_epochs):
        G, n, m = counts.shape
        torch._check(nu.shape == (G, n, m - 1), lambda: "nu must be (G, n, q)")
        torch._check(evecs.shape[0] == n, lambda: "evecs must be (n, r)")
        torch._check(max_epochs >= 0, lambda: "max_epochs must be >= 0")
        f64 = {"dtype": torch.float64, "device": counts.device}
        epochs = torch.library.get_ctx().new_dynamic_size()
        return (torch.empty_like(nu), torch.empty_like(beta), torch.empty_like(bias),
                torch.empty_like(sigma), torch.empty_like(theta_logit),
                counts.new_empty((epochs, G), dtype=torch.float64),
                torch.empty(G, **f64), torch.empty(G, dtype=torch.long, device=counts.device),
                torch.empty(G, dtype=torch.bool, device=counts.device),
                torch.empty((), dtype=torch.bool, device=counts.device))
