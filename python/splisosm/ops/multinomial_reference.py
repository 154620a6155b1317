"""Pure-torch references of the multinomial ops: plain, readable, and the fallback on devices
without native kernels. Arrays are ``(G, n, ...)`` (genes, spots); of a gene's ``m`` isoforms the
last is the reference category (logit 0), so ``eta`` has ``q = m - 1`` columns."""

from __future__ import annotations

import torch
from torch import Tensor


def multinom_probs(eta: Tensor) -> Tensor:
    """Isoform probabilities ``(G, n, m)`` from logits ``eta (G, n, q)`` (reference logit 0)."""
    zeros = torch.zeros_like(eta[..., :1])
    return torch.softmax(torch.cat([eta, zeros], dim=-1), dim=-1)


def multinom_terms_reference(eta: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Log-likelihood ``(G,)``, gradient ``(G, n, q)`` and curvature blocks ``(G, n, q, q)``."""
    q = eta.shape[-1]
    log_p = torch.log_softmax(torch.cat([eta, torch.zeros_like(eta[..., :1])], dim=-1), dim=-1)
    total = counts.sum(-1)
    # 0 * log(0) must count as 0 for spots where a probability underflows.
    weighted = torch.where(counts > 0, counts * log_p, torch.zeros_like(log_p))
    loglik = (
        torch.lgamma(total + 1) - torch.lgamma(counts + 1).sum(-1) + weighted.sum(-1)
    ).sum(-1)
    p = log_p.exp()[..., :q]
    grad = counts[..., :q] - total[..., None] * p
    W = total[..., None, None] * (torch.diag_embed(p) - p[..., :, None] * p[..., None, :])
    return loglik, grad, W


def fixed_effect_info_reference(X: Tensor, W: Tensor, resid: Tensor) -> tuple[Tensor, Tensor]:
    """Information ``X~^T W X~`` and score ``X~^T r`` for the design ``X~ = [X, 1]``.

    The flattened index is isoform-major, ``j * (P + 1) + f``, with the intercept last
    (``f = P``).
    """
    G, n, q = resid.shape
    Xt = torch.cat([X, torch.ones(n, 1, dtype=X.dtype, device=X.device)], dim=1)
    P1 = Xt.shape[1]
    info = torch.einsum("sf,gsjk,sh->gjfkh", Xt, W, Xt).reshape(G, q * P1, q * P1)
    score = torch.einsum("sf,gsj->gjf", Xt, resid).reshape(G, q * P1)
    return info, score
