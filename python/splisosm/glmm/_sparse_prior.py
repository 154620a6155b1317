"""The prior terms of the precision-only (sparse) route as a differentiable custom op.

With only the kernel's sparse precision ``Q = K^-1``, the prior terms of a column need solves
with ``a Q + tau I`` and the trace of its inverse for the gradient in the variance parameters;
the traces come from a table in the shifts, built once per precision.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from splisosm.ops.laplace import sparse_shifted_solve

__all__ = ["ShiftedTraces", "shifted_traces", "sparse_prior_terms"]

class ShiftedTraces:
    """``tr (a Q + tau I)^-1`` of one sparse precision ``Q`` for any ``a, tau > 0``.

    With ``t = tau / a = theta / (1 - theta)`` (the spatial odds) and ``u = log t``,
    ``tr (a Q + tau I)^-1 = g(u) / tau`` where ``g(u) = sum_i t / (lambda_i + t)`` over the
    eigenvalues of ``Q``: one smooth bounded function of ``u`` for every gene, isoform and
    parameter value. It is tabulated once per ``Q`` by a Chebyshev interpolant in ``u`` on
    ``[-SPAN, SPAN]`` (``NODES`` sparse factorisations with selected inversion), accurate to about
    1e-13 relative there; outside, the trace is computed exactly. Gradient fitters on the sparse
    route need the trace in every step, and the selected inversion costs twice the factorisation.
    """

    SPAN = 6.0
    NODES = 64

    def __init__(self, crow: Tensor, col: Tensor, val: Tensor) -> None:
        self._csr = (crow, col, val)
        self.n = crow.numel() - 1
        k = torch.arange(self.NODES, dtype=torch.float64)
        angles = math.pi * (k + 0.5) / self.NODES
        t = torch.exp(self.SPAN * torch.cos(angles))
        trace = sparse_shifted_solve(crow, col, val, torch.ones_like(t), t,
                                     t.new_zeros(self.NODES, 0, self.n), trace_inverse=True)[2]
        g = t * trace
        coef = (2.0 / self.NODES) * torch.cos(k[:, None] * angles[None, :]) @ g
        coef[0] /= 2
        self._coef = coef

    @property
    def coefficients(self) -> Tensor:
        """Chebyshev coefficients ``(NODES,)`` of ``g`` on ``[-SPAN, SPAN]``."""
        return self._coef

    def __call__(self, a: Tensor, tau: Tensor) -> Tensor:
        """``tr (a Q + tau I)^-1`` elementwise for float64 CPU ``a, tau`` of one shape."""
        return _tabulated_trace(self._coef, self._csr, a, tau)


def _tabulated_trace(coef: Tensor, csr: tuple[Tensor, Tensor, Tensor], a: Tensor, tau: Tensor
                     ) -> Tensor:
    """``tr (a Q + tau I)^-1`` from the coefficients of :class:`ShiftedTraces` (exact where
    ``log(tau / a)`` lies outside the table)."""
    span = ShiftedTraces.SPAN
    u = torch.log(tau / a)
    inside = u.abs() <= span
    x = (u / span).clamp(-1.0, 1.0)
    orders = torch.arange(coef.numel(), dtype=torch.float64)
    g = torch.cos(orders * torch.acos(x)[..., None]) @ coef
    out = g / tau
    if not bool(inside.all()):
        far = ~inside
        rhs = a.new_zeros(int(far.sum()), 0, csr[0].numel() - 1)
        out[far] = sparse_shifted_solve(*csr, a[far], tau[far], rhs, trace_inverse=True)[2]
    return out


_TRACE_TABLES: dict[bytes, ShiftedTraces] = {}
_MAX_TRACE_TABLES = 8


def shifted_traces(csr: tuple[Tensor, Tensor, Tensor]) -> ShiftedTraces:
    """The :class:`ShiftedTraces` of a CSR precision, built once per process and matrix."""
    digest = hashlib.blake2b(digest_size=16)
    for t in csr:
        digest.update(t.numpy().tobytes())
    key = digest.digest()
    table = _TRACE_TABLES.get(key)
    if table is None:
        if len(_TRACE_TABLES) >= _MAX_TRACE_TABLES:
            _TRACE_TABLES.clear()
        table = _TRACE_TABLES[key] = ShiftedTraces(*csr)
    return table


@torch.library.custom_op("splisosm::sparse_prior_terms", mutates_args=())
def sparse_prior_terms(
    nu: Tensor,
    a: Tensor,
    tau: Tensor,
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    logdet_q: float,
    trace_coef: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Prior terms of the precision-only form, per gene, with first derivatives (a torch op).

    Per column, ``M = a Q + tau I`` and ``y = M^-1 nu``:
    ``Sigma^-1 nu = tau nu - tau^2 y``, ``quad = nu^T Sigma^-1 nu`` and
    ``log det Sigma = log det M - log det Q - n log a - n log tau``, so
    ``d quad / d nu = 2 Sigma^-1 nu``, ``d quad / d a = tau^2 y^T Q y`` (``Q y = (nu - tau y) / a``),
    ``d quad / d tau = |nu - tau y|^2``, ``d log det Sigma / d a = -tau tr(M^-1) / a`` and
    ``d log det Sigma / d tau = tr(M^-1) - n / tau``.

    Parameters
    ----------
    nu
        Random effects ``(G, n, q)``, float64.
    a, tau
        ``(G, q)``: ``Sigma_j = (a_j Q)^-1 + I / tau_j``.
    crow, col, val
        Canonical CSR arrays of ``Q``.
    logdet_q
        ``log det Q``.
    trace_coef
        :attr:`ShiftedTraces.coefficients` of ``Q``, for ``tr(M^-1)``, which the derivatives in
        ``a`` and ``tau`` need; ``None`` where they are not needed.

    Returns
    -------
    quad, logdet_sigma, prec_nu, y, trace
        ``(G,)``, ``(G,)``, ``(G, n, q)``, ``y`` per column ``(G, q, n)`` and ``tr(M^-1)``
        ``(G, q)`` (``(0,)`` without ``trace_coef``). Only ``quad`` and ``logdet_sigma`` are
        differentiable; ``y`` and ``trace`` are what their derivatives need.
    """
    G, n, q = nu.shape
    csr = (crow, col, val)
    if q > 1 and bool((a == a[:, :1]).all()) and bool((tau == tau[:, :1]).all()):
        # a shared variance: one factor and one solve with q right-hand sides per gene
        y, logdet_m = sparse_shifted_solve(*csr, a[:, 0], tau[:, 0],
                                           nu.permute(0, 2, 1).contiguous())
        logdet_m = logdet_m[:, None].expand(G, q)
    else:
        rhs = nu.permute(0, 2, 1).reshape(G * q, 1, n)
        y, logdet_m = sparse_shifted_solve(*csr, a.reshape(-1), tau.reshape(-1), rhs)
    y = y.reshape(G, q, n).contiguous()  # M_j^-1 nu_j per column
    prec = tau[:, None, :] * nu - tau[:, None, :] ** 2 * y.permute(0, 2, 1)
    logdet = (logdet_m.reshape(G, q) - logdet_q - n * torch.log(a) - n * torch.log(tau)).sum(1)
    quad = (nu * prec).sum((1, 2))
    trace = a.new_empty(0) if trace_coef is None else _tabulated_trace(trace_coef, csr, a, tau)
    return quad, logdet, prec, y, trace


@sparse_prior_terms.register_fake
def _sparse_prior_terms_fake(nu, a, tau, crow, col, val, logdet_q, trace_coef):
    G, n, q = nu.shape
    for name, t in (("a", a), ("tau", tau)):
        torch._check(t.dim() == 2, lambda name=name: f"`{name}` must be (G, q)")
        torch._check(t.shape[0] == G, lambda name=name: f"`{name}` must have G = {G} rows")
        torch._check(t.shape[1] == q, lambda name=name: f"`{name}` must have q = {q} columns")
    y = nu.new_empty(G, q, n)
    # the layout of prec follows nu's, as the real kernel's elementwise formula makes it
    prec = tau[:, None, :] * nu - tau[:, None, :] ** 2 * y.permute(0, 2, 1)
    trace = a.new_empty(0) if trace_coef is None else a.new_empty(G, q)
    return nu.new_empty(G), nu.new_empty(G), prec, y, trace


def _sparse_prior_terms_setup_context(ctx, inputs, output) -> None:
    nu, a, tau, _, _, _, _, trace_coef = inputs
    _, _, prec, y, trace = output
    ctx.save_for_backward(nu, y, prec, a, tau, trace)
    ctx.has_trace = trace_coef is not None
    ctx.mark_non_differentiable(prec, y, trace)


@torch.autograd.function.once_differentiable
def _sparse_prior_terms_backward(ctx, g_quad, g_logdet, *_):
    nu, y, prec, a, tau, trace = ctx.saved_tensors
    n = nu.shape[1]
    y = y.permute(0, 2, 1)
    g_nu = g_a = g_tau = None
    if ctx.needs_input_grad[0]:
        g_nu = 2 * g_quad[:, None, None] * prec
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        if not ctx.has_trace:
            raise RuntimeError("splisosm::sparse_prior_terms: the derivatives in `a` and `tau` "
                               "need `trace_coef`")
        resid = nu - tau[:, None, :] * y  # a Q y
        gq, gl = g_quad[:, None], g_logdet[:, None]
        g_a = gq * tau**2 * (y * resid).sum(1) / a - gl * tau * trace / a
        g_tau = gq * (resid * resid).sum(1) + gl * (trace - n / tau)
    return g_nu, g_a, g_tau, None, None, None, None, None


sparse_prior_terms.register_autograd(_sparse_prior_terms_backward,
                                     setup_context=_sparse_prior_terms_setup_context)
