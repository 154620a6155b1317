"""Multinomial-softmax ops: native kernels with fake kernels, autograd and a reference fallback."""

from __future__ import annotations

import torch
from torch import Tensor

from splisosm.ops._native import NATIVE_AVAILABLE, has_native_kernel
from splisosm.ops.multinomial_reference import (
    fixed_effect_info_reference,
    multinom_probs,
    multinom_terms_reference,
)


def _check_multinom(eta: Tensor, counts: Tensor) -> None:
    if not isinstance(eta, Tensor) or eta.dim() != 3:
        raise ValueError(f"`eta` must be a (G, n, q) tensor, got {getattr(eta, 'shape', type(eta))}")
    if not isinstance(counts, Tensor) or counts.dim() != 3:
        raise ValueError(
            f"`counts` must be a (G, n, m) tensor, got {getattr(counts, 'shape', type(counts))}"
        )
    if eta.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`eta` must be float32 or float64, got {eta.dtype}")
    if counts.dtype != eta.dtype or counts.device != eta.device:
        raise ValueError(
            f"`counts` must match `eta` in dtype and device ({eta.dtype}, {eta.device}), "
            f"got {counts.dtype}, {counts.device}"
        )
    G, n, q = eta.shape
    if counts.shape != (G, n, q + 1):
        raise ValueError(
            f"`counts` must have shape (G, n, q + 1) = {(G, n, q + 1)} to match `eta`, "
            f"got {tuple(counts.shape)}"
        )


def multinom_terms(eta: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Multinomial log-likelihood, gradient and per-spot curvature in one pass.

    Parameters
    ----------
    eta
        Logits of the non-reference isoforms, ``(G, n, q)``.
    counts
        Isoform counts ``(G, n, q + 1)``, last column the reference isoform.

    Returns
    -------
    loglik
        ``(G,)`` log-likelihood including the multinomial log-factorial constants.
    grad
        ``(G, n, q)`` derivative of ``loglik`` with respect to ``eta``: ``Y[:q] - N p[:q]``.
    W
        ``(G, n, q, q)`` blocks ``N (diag p - p p^T)`` (minus the Hessian).

    Notes
    -----
    Differentiable in ``eta`` (all three outputs), so gradient-descent fitters can back-propagate
    through it. Devices without a native kernel use :func:`multinom_terms_reference`.
    """
    _check_multinom(eta, counts)
    if has_native_kernel("multinom_terms", eta.device):
        return torch.ops.splisosm.multinom_terms(eta, counts)
    if not bool(torch.isfinite(counts).all()):
        raise ValueError("`counts` contains NaN or infinite values")
    if bool((counts < 0).any()):
        raise ValueError("`counts` contains negative values")
    return multinom_terms_reference(eta, counts)


def fixed_effect_info(X: Tensor, W: Tensor, resid: Tensor) -> tuple[Tensor, Tensor]:
    """Fixed-effect information ``X~^T W X~`` and score ``X~^T r`` with ``X~ = [X, 1]``.

    Parameters
    ----------
    X
        Design ``(n, P)`` without intercept (``P`` may be 0).
    W
        Curvature blocks ``(G, n, q, q)`` from :func:`multinom_terms`.
    resid
        Residuals ``(G, n, q)`` (the ``grad`` output of :func:`multinom_terms`).

    Returns
    -------
    info
        ``(G, q (P + 1), q (P + 1))``, flattened isoform-major (``j * (P + 1) + f``).
    score
        ``(G, q (P + 1))`` in the same layout.
    """
    if not isinstance(W, Tensor) or W.dim() != 4 or W.shape[-1] != W.shape[-2]:
        raise ValueError(f"`W` must be a (G, n, q, q) tensor, got {getattr(W, 'shape', type(W))}")
    G, n, q, _ = W.shape
    if not isinstance(X, Tensor) or X.dim() != 2 or X.shape[0] != n:
        raise ValueError(f"`X` must be a ({n}, P) tensor, got {getattr(X, 'shape', type(X))}")
    if not isinstance(resid, Tensor) or tuple(resid.shape) != (G, n, q):
        raise ValueError(
            f"`resid` must have shape {(G, n, q)}, got {getattr(resid, 'shape', type(resid))}"
        )
    for name, t in (("X", X), ("resid", resid)):
        if t.dtype != W.dtype or t.device != W.device:
            raise ValueError(
                f"`{name}` must match `W` in dtype and device ({W.dtype}, {W.device}), "
                f"got {t.dtype}, {t.device}"
            )
    if has_native_kernel("fixed_effect_info", W.device):
        return torch.ops.splisosm.fixed_effect_info(X, W, resid)
    return fixed_effect_info_reference(X, W, resid)


def _multinom_backward(ctx, d_loglik: Tensor, d_grad: Tensor, d_W: Tensor):
    """Vector-Jacobian product of (loglik, grad, W) with respect to eta.

    d loglik / d eta = grad; d grad / d eta = -W; and for W_jk = N (d_jk p_j - p_j p_k),
    sum_jk dW_jk dW_jk/deta_l = N p_l [dW_ll - <diag dW, p> - ((dW + dW^T) p)_l + 2 p^T dW p].
    """
    eta, counts, grad, W = ctx.saved_tensors
    d_eta = torch.zeros_like(eta)
    if d_loglik is not None:
        d_eta = torch.addcmul(d_eta, d_loglik[:, None, None], grad)
    if d_grad is not None:
        d_eta = d_eta - torch.einsum("gsjk,gsk->gsj", W, d_grad)
    if d_W is not None:
        total = counts.sum(-1, keepdim=True)
        p = multinom_probs(eta)[..., :-1]
        diag = torch.diagonal(d_W, dim1=-2, dim2=-1)
        sym_p = torch.einsum("gsjk,gsk->gsj", d_W + d_W.transpose(-1, -2), p)
        quad = torch.einsum("gsj,gsjk,gsk->gs", p, d_W, p)[..., None]
        inner = (diag * p).sum(-1, keepdim=True)
        d_eta = d_eta + total * p * (diag - inner - sym_p + 2 * quad)
    return d_eta, None


def _multinom_setup_context(ctx, inputs, output) -> None:
    eta, counts = inputs
    _, grad, W = output
    ctx.save_for_backward(eta, counts, grad, W)
    # Fitters usually differentiate the log-likelihood alone: leave the other outputs' gradients
    # as None instead of zero tensors, so backward skips their (softmax and einsum) terms.
    ctx.set_materialize_grads(False)


def _fixed_effect_info_fake(X: Tensor, W: Tensor, resid: Tensor) -> tuple[Tensor, Tensor]:
    G, _, q, _ = W.shape
    k = q * (X.shape[1] + 1)
    return W.new_empty(G, k, k), W.new_empty(G, k)


def _multinom_terms_fake(eta: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    G, n, q = eta.shape
    return eta.new_empty(G), eta.new_empty(G, n, q), eta.new_empty(G, n, q, q)


if NATIVE_AVAILABLE:
    torch.library.register_fake("splisosm::multinom_terms")(_multinom_terms_fake)
    torch.library.register_fake("splisosm::fixed_effect_info")(_fixed_effect_info_fake)
    torch.library.register_autograd(
        "splisosm::multinom_terms", _multinom_backward, setup_context=_multinom_setup_context
    )
