"""The native fitting engine: whole ``joint_gd`` fits of a batch of genes in one op call.

It runs on the CPU and, in a build with the CUDA kernels, on the GPU (every epoch on the device,
float32 or float64 as the model's dtype). The Python fitter in :mod:`splisosm.glmm.model` (autograd,
with Adam and SGD updates identical to ``torch.optim``'s) computes the same trajectories and stays
the reference the engine is tested against; the GPU engine is tested against the CPU engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from splisosm.ops._native import NATIVE_AVAILABLE, has_native_kernel

#: Optimisers the engine implements (L-BFGS stays with the Python fitter).
ENGINE_OPTIMIZERS = ("adam", "sgd")


@dataclass
class EngineFit:
    """What :func:`joint_gd_fit` returns for one group of genes.

    Attributes
    ----------
    params
        Best parameters per gene: ``nu, beta, bias_eta, sigma`` (absolute value), ``theta_logit``.
    loss_history
        ``(epochs, G)`` float64 losses as logged after each epoch (non-finite shown as +inf).
    best_loss, best_epoch, converged
        ``(G,)`` per-gene early-stopping outcome.
    """

    params: dict[str, Tensor]
    loss_history: Tensor
    best_loss: Tensor
    best_epoch: Tensor
    converged: Tensor


#: The per-gene parameters of a fit, in the op's order.
PARAM_NAMES = ("nu", "beta", "bias_eta", "sigma", "theta_logit")


def engine_available(device: torch.device) -> bool:
    """Whether the compiled engine can fit on ``device``."""
    return has_native_kernel("joint_gd_fit", device)


def engine_runs(method: str, optim: str, has_eigenpairs: bool, device: torch.device) -> bool:
    """Whether a fit goes to the engine: ``joint_gd`` with Adam or SGD, a kernel given by
    eigenpairs (or no spatial kernel at all: a null model), on a device with the compiled op."""
    return (method == "joint_gd" and optim in ENGINE_OPTIMIZERS and has_eigenpairs
            and engine_available(device))


def joint_gd_fit(
    counts: Sequence[Tensor],
    X: Tensor,
    evals: Tensor,
    evecs: Tensor,
    params: Sequence[dict[str, Tensor]],
    *,
    train_sigma: bool,
    train_theta: bool,
    prior: str,
    prior_params: dict[str, float],
    min_variance: float,
    max_theta: float,
    configs: dict,
) -> tuple[list[EngineFit], bool]:
    """Fit groups of genes by gradient descent on the joint log-likelihood, natively.

    The groups (genes of one isoform count each) share the design and the kernel and are fitted
    epoch by epoch together; each gene's fit is the same as it would be alone.

    Parameters
    ----------
    counts
        Per group, ``(G, n, m)`` isoform counts.
    X
        ``(n, P)`` design (``P`` may be 0).
    evals, evecs
        ``(r,)`` and ``(n, r)`` kernel eigenpairs; ``r = 0`` for a white-noise prior.
    params
        Per group, the starting values ``nu, beta, bias_eta, sigma, theta_logit``; not modified.
    train_sigma, train_theta
        Whether ``sigma`` / ``theta_logit`` are optimised (otherwise held fixed).
    prior, prior_params
        Variance prior ``'none'``, ``'gamma'`` or ``'inv_gamma'`` and its ``alpha``, ``beta``.
    min_variance, max_theta
        Floor of ``sigma^2`` and cap of ``sigmoid(theta_logit)``.
    configs
        Resolved fitting configuration: ``optim`` (``'adam'`` or ``'sgd'``), ``lr``, ``tol``,
        ``tol_relative``, ``patience``, ``max_epochs``.

    Returns
    -------
    One :class:`EngineFit` per group, and whether any ``sigma^2`` fell below the variance floor.
    """
    start = [[group[name] for group in params] for name in PARAM_NAMES]
    out = torch.ops.splisosm.joint_gd_fit(
        list(counts), X, evals, evecs, *start, bool(train_sigma), bool(train_theta), prior,
        float(prior_params.get("alpha", 0.0)), float(prior_params.get("beta", 0.0)),
        float(min_variance), float(max_theta), configs["optim"], float(configs["lr"]),
        float(configs["tol"]), bool(configs.get("tol_relative", False)),
        int(configs["patience"]), int(configs["max_epochs"]),
    )
    fits = [EngineFit(dict(zip(PARAM_NAMES, (out[k][i] for k in range(5)))), out[5][i], out[6][i],
                      out[7][i], out[8][i]) for i in range(len(counts))]
    return fits, bool(out[9])


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
        torch._check(len(counts) >= 1, lambda: "counts must hold at least one group of genes")
        torch._check(max_epochs >= 0, lambda: "max_epochs must be >= 0")
        ctx = torch.library.get_ctx()
        outs: list[list[Tensor]] = [[] for _ in range(9)]
        for Y, u, b, c, s, t in zip(counts, nu, beta, bias, sigma, theta_logit, strict=True):
            G, n, m = Y.shape
            torch._check(u.shape == (G, n, m - 1), lambda: "nu must be (G, n, q)")
            torch._check(evecs.shape[0] == n, lambda: "evecs must be (n, r)")
            epochs = ctx.new_dynamic_size()
            for k, like in enumerate((u, b, c, s, t)):
                outs[k].append(torch.empty_like(like))
            outs[5].append(Y.new_empty((epochs, G), dtype=torch.float64))
            outs[6].append(Y.new_empty(G, dtype=torch.float64))
            outs[7].append(Y.new_empty(G, dtype=torch.long))
            outs[8].append(Y.new_empty(G, dtype=torch.bool))
        return (*outs, X.new_empty((), dtype=torch.bool))
