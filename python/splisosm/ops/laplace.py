"""Laplace-system ops: Newton solves and exact log-determinants of ``H = I_q (x) Sigma^-1 + W``.

Per gene, column ``j`` of the random effect has prior covariance
``Sigma_j = v_j (theta_j K + (1 - theta_j) I)`` and ``W (n, q, q)`` holds the per-spot multinomial
curvature. Two forms of the kernel are supported:

* eigenbasis ``K = V diag(lambda) V^T`` (rank ``r <= n``; ``r < n`` is the low-rank model with
  covariance ``V diag(c) V^T + d (I - V V^T)`` and residual eigenvalue ``d = v (1 - theta)``):
  block-Jacobi preconditioned CG for solves (:func:`laplace_solve_eig`, any rank), the
  determinant lemma for log-determinants (:func:`laplace_logdet_eig`), and for ``r < n`` a direct
  solve plus log-determinant from one ``rq x rq`` factor (:func:`laplace_lowrank`);
* sparse precision ``Q = K^-1`` (CSR, float64): one sparse Cholesky factor per gene of the system
  left after eliminating the white-noise part of the prior, exact at any ``n``
  (:func:`laplace_sparse`), and the gradients of its log-determinant by selected inversion of
  that factor (:func:`laplace_sparse_logdet_grad`, differentiable as
  :func:`laplace_sparse_logdet`).

The wrappers dispatch to the native kernel and fall back to the dense references of
:mod:`splisosm.ops.laplace_reference` where there is none. The native kernels check their inputs
themselves (``csrc/checks.h``; a bad argument is a ``ValueError`` naming it), so the wrappers check
only what they read themselves (the layout of ``W`` and ``rhs``, and the sparse precision, which
they bring into the canonical form the kernels need); the references check nothing, and
:func:`_check_reference_inputs` makes the same checks in Python before them. Numerical failures
(a system that is not positive definite, CG without convergence) raise ``RuntimeError`` naming
the gene.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from splisosm.ops._native import NATIVE_AVAILABLE, has_native_kernel
from splisosm.ops.laplace_reference import (
    laplace_logdet_eig_reference,
    laplace_solve_eig_reference,
    laplace_sparse_logdet_grad_reference,
    laplace_sparse_logdet_reference,
    laplace_sparse_reference,
    sparse_inverse_diagonal_reference,
    sparse_shifted_solve_reference,
)

_FLOATS = (torch.float32, torch.float64)


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def _check_W(W: object) -> tuple[int, int, int]:
    """``W`` is a ``(G, n, q, q)`` tensor: what the wrappers read to pick the kernel and to shape
    the other arguments (the kernels check the rest)."""
    if not isinstance(W, Tensor) or W.dim() != 4:
        raise ValueError(f"`W` must be a (G, n, q, q) tensor, got {_shape(W)}")
    G, n, q, _ = W.shape
    return G, n, q


def _rhs_4d(rhs: object, W: Tensor) -> tuple[Tensor, bool]:
    """``rhs`` ``(G, n, q)`` or ``(G, R, n, q)`` as 4-D, and whether it was 3-D; ``None`` (the
    log-determinant alone) as zero right-hand sides."""
    if rhs is None:
        G, n, q, _ = W.shape
        return W.new_zeros(G, 0, n, q), False
    if not isinstance(rhs, Tensor) or rhs.dim() not in (3, 4):
        raise ValueError(f"`rhs` must be a (G, n, q) or (G, R, n, q) tensor, got {_shape(rhs)}")
    squeeze = rhs.dim() == 3
    return (rhs[:, None] if squeeze else rhs), squeeze


def _solution_as_given(x: Tensor, rhs: Tensor | None, squeeze: bool) -> Tensor | None:
    """The solution in the layout the caller passed ``rhs`` in (``None`` without ``rhs``)."""
    if rhs is None:
        return None
    return x[:, 0] if squeeze else x


def _check_tensor(t: object, name: str, shape: tuple[int | None, ...], layout: str) -> None:
    """``t`` is a floating tensor of ``shape`` (``None`` = any size) with finite values."""
    if not isinstance(t, Tensor) or t.dim() != len(shape):
        raise ValueError(f"`{name}` must be a {layout} tensor, got {_shape(t)}")
    if any(want is not None and got != want for got, want in zip(t.shape, shape)):
        expected = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"`{name}` must have shape {layout} = {expected}, got {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"`{name}` must be float32 or float64, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"`{name}` contains NaN or infinite values")


def _check_reference_inputs(
    W: Tensor | None = None,
    rhs: Tensor | None = None,
    *,
    evals: Tensor | None = None,
    evecs: Tensor | None = None,
    v: Tensor | None = None,
    theta: Tensor | None = None,
    open_theta: bool = False,
    low_rank: bool = False,
    cg: tuple[float, int] | None = None,
    csr_size: int | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> None:
    """The checks that the native kernels make in C++ (``csrc/checks.h``), for the references.

    Only the reference path calls this: the dense references check nothing themselves, while a
    native kernel checks its own inputs (a ``ValueError`` naming the argument, as here), so a
    check in Python before it would repeat the kernel's and, on a GPU, wait for the device.

    The Laplace ops pass ``W`` (a ``(G, n, q, q)`` tensor), ``rhs`` as ``(G, R, n, q)``, ``v`` and
    ``theta`` and what else they take: the eigenpairs, ``open_theta`` (the sparse form needs
    ``theta > 0``), ``low_rank`` (:func:`laplace_lowrank`), ``cg = (tol, max_iter)``
    (:func:`laplace_solve_eig`) or ``csr_size``, the ``n`` of the sparse precision.
    :func:`sparse_shifted_solve` passes ``rhs (G, R, n)``, ``scale``, ``shift`` and ``csr_size``.
    """
    if W is None:
        _check_tensor(scale, "scale", (None,), "(G,)")
        G = scale.shape[0]
        _check_tensor(shift, "shift", (G,), "(G,) as `scale`")
        _check_tensor(rhs, "rhs", (G, None, csr_size), "(G, R, n)")
        if not bool((scale > 0).all()) or not bool((shift >= 0).all()):
            raise ValueError("`scale` must be positive and `shift` non-negative")
        return
    G, n, q, _ = W.shape
    _check_tensor(W, "W", (G, n, q, q), "(G, n, q, q)")
    if q < 1:
        raise ValueError("`W` needs q >= 1 columns")
    if rhs is not None:
        _check_tensor(rhs, "rhs", (G, None, n, q), "(G, R, n, q)")
    if evecs is not None:
        _check_tensor(evecs, "evecs", (n, None), "(n, r)")
        r = evecs.shape[1]
        _check_tensor(evals, "evals", (r,), "(r,) matching evecs")
        if not 1 <= r <= n:
            raise ValueError(f"`evecs` must have 1 <= r <= n = {n} columns, got {r}")
        if low_rank and r >= n:
            raise ValueError(f"`evecs` must be low rank (r < n = {n}), got r = {r}")
    if csr_size is not None and csr_size != n:
        raise ValueError(f"`crow` must have n + 1 = {n + 1} entries, got {csr_size + 1}")
    _check_tensor(v, "v", (G, q), "(G, q)")
    _check_tensor(theta, "theta", (G, q), "(G, q)")
    for name, t in (("rhs", rhs), ("evals", evals), ("evecs", evecs), ("v", v), ("theta", theta)):
        if t is not None and t.device != W.device:
            raise ValueError(f"`{name}` must be on the device of `W` ({W.device}), got {t.device}")
    if not bool((v > 0).all()):
        raise ValueError("`v` (total variance) must be positive")
    low_ok = bool((theta > 0).all()) if open_theta else bool((theta >= 0).all())
    if not low_ok or not bool((theta < 1).all()):
        bounds = "0 < theta < 1" if open_theta else "0 <= theta < 1"
        raise ValueError(f"`theta` (spatial proportion) must satisfy {bounds}")
    if evecs is not None:  # prior eigenvalues v (theta lambda + 1 - theta), given v > 0
        c_min = theta.to(torch.float64) * float(evals.min()) + (1 - theta.to(torch.float64))
        if not bool((c_min > 0).all()):
            raise ValueError("`evals` too negative: the prior eigenvalues v (theta lambda + 1 - "
                             "theta) must be > 0")
    if cg is not None:
        tol, max_iter = cg
        if not tol > 0:
            raise ValueError(f"`tol` must be positive, got {tol}")
        if max_iter < 1:
            raise ValueError(f"`max_iter` must be >= 1, got {max_iter}")


# A fit calls the sparse ops hundreds of times with the same three tensors (its precision), and
# the entry-wise checks and canonicalisation read all nnz entries each time; a triple that is
# still the same objects at the same versions (no in-place change since) is checked once. The
# last _MAX_CHECKED_CSR triples are remembered, with their canonical forms. (The native kernels
# check the structure again, cheaply, for callers of the ops themselves.)
_CHECKED_CSR: list[tuple[tuple[int, ...], tuple[weakref.ref, ...], tuple[Tensor, ...]]] = []
_MAX_CHECKED_CSR = 4


def check_csr(crow: object, col: object, val: object) -> tuple[Tensor, ...]:
    """A square CSR matrix in the canonical form the native kernels need: ``(crow int64,
    col int64, val float64)`` with columns sorted within rows and duplicates summed.

    Canonicalising relies on a valid structure, so this checks it (and that the values are
    finite) on every path, native or not; ``ValueError`` naming the argument.
    """
    for name, t in (("crow", crow), ("col", col), ("val", val)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise ValueError(f"`{name}` must be a 1-D tensor, got {_shape(t)}")
    if crow.dtype not in (torch.int32, torch.int64) or col.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"`crow` and `col` must be integer tensors, got {crow.dtype}, {col.dtype}")
    if val.dtype != torch.float64:
        raise ValueError(f"`val` must be float64 (the sparse precision), got {val.dtype}")
    size = crow.numel() - 1
    if size < 1:
        raise ValueError(f"`crow` must have n + 1 >= 2 entries, got {crow.numel()}")
    nnz = col.numel()
    if val.numel() != nnz:
        raise ValueError(f"`val` must have nnz = {nnz} entries (as `col`), got {val.numel()}")
    tensors = (crow, col, val)
    key = tuple(id(t) for t in tensors) + tuple(t._version for t in tensors)
    for known, refs, canonical in _CHECKED_CSR:
        if known == key and all(r() is t for r, t in zip(refs, tensors)):
            return canonical
    crow, col = crow.to(torch.int64), col.to(torch.int64)
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        raise ValueError("`crow` must be non-decreasing from 0 to nnz")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= size):
        raise ValueError(f"`col` indices must lie in [0, {size})")
    if not bool(torch.isfinite(val).all()):
        raise ValueError("`val` contains NaN or infinite values")
    canonical = _canonical_csr(crow, col, val)
    _CHECKED_CSR.append((key, tuple(weakref.ref(t) for t in tensors), canonical))
    del _CHECKED_CSR[:-_MAX_CHECKED_CSR]
    return canonical


def _canonical_csr(crow: Tensor, col: Tensor, val: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Columns sorted within rows and duplicates summed (what the native kernels require)."""
    n = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow.diff())
    key = rows * n + col
    if col.numel() < 2 or bool((key[1:] > key[:-1]).all()):
        return crow.contiguous(), col.contiguous(), val.contiguous()
    key, order = torch.sort(key)
    key, inverse = torch.unique_consecutive(key, return_inverse=True)
    summed = torch.zeros(key.numel(), dtype=val.dtype, device=val.device)
    summed.index_add_(0, inverse, val[order])
    counts = torch.bincount(key // n, minlength=n)
    crow = torch.cat([crow.new_zeros(1), torch.cumsum(counts, 0)])
    return crow, key % n, summed


def laplace_solve_eig(
    W: Tensor,
    rhs: Tensor,
    evals: Tensor,
    evecs: Tensor,
    v: Tensor,
    theta: Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int | None = None,
    return_iterations: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Solve ``H x = rhs`` with the eigenbasis prior by block-Jacobi preconditioned CG.

    Parameters
    ----------
    W
        Curvature blocks ``(G, n, q, q)``, symmetric PSD per spot.
    rhs
        Right-hand sides ``(G, n, q)`` or ``(G, R, n, q)``.
    evals, evecs
        Kernel eigenpairs ``(r,)`` and ``(n, r)``; ``r < n`` is the low-rank prior.
    v, theta
        Total variance and spatial proportion per gene and column, ``(G, q)``.
    tol
        Relative residual ``||H x - rhs|| <= tol ||rhs||`` per gene and right-hand side.
    max_iter
        CG iteration cap (default ``max(100, 2 n q)``); not converging raises ``RuntimeError``.
    return_iterations
        Also return the CG iterations used per gene ``(G,)``.

    Returns
    -------
    Tensor
        ``H^-1 rhs`` with the shape and dtype of ``rhs`` (and the iterations if requested).
    """
    G, n, q = _check_W(W)
    rhs4, squeeze = _rhs_4d(rhs, W)
    max_iter = max(100, 2 * n * q) if max_iter is None else int(max_iter)
    if has_native_kernel("laplace_solve_eig", W.device):
        x, iters = torch.ops.splisosm.laplace_solve_eig(
            W, rhs4, evals, evecs, v, theta, float(tol), max_iter
        )
    else:
        _check_reference_inputs(W, rhs4, evals=evals, evecs=evecs, v=v, theta=theta,
                                cg=(tol, max_iter))
        x = laplace_solve_eig_reference(W, rhs4, evals, evecs, v, theta)
        iters = torch.zeros(G, dtype=torch.int64, device=W.device)
    x = x[:, 0] if squeeze else x
    return (x, iters) if return_iterations else x


def laplace_logdet_eig(W: Tensor, evals: Tensor, evecs: Tensor, v: Tensor, theta: Tensor) -> Tensor:
    """``log det H`` per gene ``(G,)`` with the eigenbasis prior (arguments as in
    :func:`laplace_solve_eig`).

    Low rank uses the matrix determinant lemma on an ``rq x rq`` system; full rank factors the
    ``n'q x n'q`` matrix ``I + W^1/2 Sigma W^1/2`` over the ``n'`` spots with non-zero ``W``.
    """
    _check_W(W)
    if has_native_kernel("laplace_logdet_eig", W.device):
        return torch.ops.splisosm.laplace_logdet_eig(W, evals, evecs, v, theta)
    _check_reference_inputs(W, evals=evals, evecs=evecs, v=v, theta=theta)
    return laplace_logdet_eig_reference(W, evals, evecs, v, theta)


def laplace_lowrank(
    W: Tensor, rhs: Tensor | None, evals: Tensor, evecs: Tensor, v: Tensor, theta: Tensor
) -> tuple[Tensor | None, Tensor]:
    """Direct ``H^-1 rhs`` and ``log det H`` for the low-rank eigenbasis prior (``r < n``).

    One ``rq x rq`` factorisation per gene gives both: the determinant lemma for the
    log-determinant and the Woodbury identity for the solve, with the low-rank correction
    ``1/c - 1/d`` of the prior precision clipped to ``[-1e6, 1e6]``. Unlike CG its cost does not
    grow as ``theta -> 1``.

    Parameters
    ----------
    W, evals, evecs, v, theta
        As in :func:`laplace_solve_eig`, with ``r < n`` eigenpairs.
    rhs
        ``(G, n, q)``, ``(G, R, n, q)`` or ``None`` (log-determinant only).

    Returns
    -------
    x, logdet
        ``H^-1 rhs`` (shape and dtype of ``rhs``; ``None`` without ``rhs``) and ``(G,)`` in the
        dtype of ``W``.
    """
    _check_W(W)
    rhs4, squeeze = _rhs_4d(rhs, W)
    if has_native_kernel("laplace_lowrank", W.device):
        x, logdet = torch.ops.splisosm.laplace_lowrank(W, rhs4, evals, evecs, v, theta)
    else:
        _check_reference_inputs(W, rhs4, evals=evals, evecs=evecs, v=v, theta=theta,
                                low_rank=True)
        x = laplace_solve_eig_reference(W, rhs4, evals, evecs, v, theta)
        logdet = laplace_logdet_eig_reference(W, evals, evecs, v, theta)
    return _solution_as_given(x, rhs, squeeze), logdet


def laplace_sparse(
    W: Tensor,
    rhs: Tensor | None,
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    v: Tensor,
    theta: Tensor,
) -> tuple[Tensor | None, Tensor]:
    """``H^-1 rhs`` and ``log det H`` with the sparse kernel precision ``Q = K^-1``.

    Parameters
    ----------
    W
        Curvature blocks ``(G, n, q, q)``.
    rhs
        ``(G, n, q)``, ``(G, R, n, q)`` or ``None`` (log-determinant only).
    crow, col, val
        CSR arrays of the symmetric positive definite ``Q`` (``val`` float64), shared by all genes.
    v, theta
        ``(G, q)`` with ``v > 0`` and ``0 < theta < 1``.

    Returns
    -------
    x, logdet
        ``H^-1 rhs`` (shape and dtype of ``rhs``; ``None`` without ``rhs``) and ``(G,)`` in the
        dtype of ``W``.
    """
    _check_W(W)
    rhs4, squeeze = _rhs_4d(rhs, W)
    crow, col, val = check_csr(crow, col, val)
    if has_native_kernel("laplace_sparse", W.device):
        x, logdet = torch.ops.splisosm.laplace_sparse(W, rhs4, crow, col, val, v, theta)
    else:
        _check_reference_inputs(W, rhs4, v=v, theta=theta, open_theta=True,
                                csr_size=crow.numel() - 1)
        x, logdet = laplace_sparse_reference(W, rhs4, crow, col, val, v, theta)
    return _solution_as_given(x, rhs, squeeze), logdet


def laplace_sparse_logdet_grad(
    W: Tensor, crow: Tensor, col: Tensor, val: Tensor, v: Tensor, theta: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``log det H`` and its gradients with the sparse kernel precision ``Q = K^-1``.

    One sparse factorisation per gene and selected inversion on its factor (the diagonal
    ``q x q`` blocks of ``H^-1`` and the entries of the eliminated system's inverse on ``Q``'s
    pattern): no dense matrix and no solve per spot. This is what makes the Laplace marginal
    differentiable for ``marginal_gd``: the native op is differentiable in ``logdet``, with these
    gradients (first derivatives only), which :func:`laplace_sparse_logdet` uses.

    Parameters
    ----------
    W, crow, col, val, v, theta
        As in :func:`laplace_sparse`.

    Returns
    -------
    logdet, grad_W, grad_v, grad_theta
        ``(G,)``, ``(G, n, q, q)`` (the symmetric diagonal blocks of ``H^-1``), ``(G, q)`` and
        ``(G, q)``; each in the dtype of the input it belongs to.
    """
    _check_W(W)
    crow, col, val = check_csr(crow, col, val)
    if has_native_kernel("laplace_sparse_logdet_grad", W.device):
        return torch.ops.splisosm.laplace_sparse_logdet_grad(W, crow, col, val, v, theta)
    _check_reference_inputs(W, v=v, theta=theta, open_theta=True, csr_size=crow.numel() - 1)
    return laplace_sparse_logdet_grad_reference(W, crow, col, val, v, theta)


def laplace_sparse_logdet(
    W: Tensor, crow: Tensor, col: Tensor, val: Tensor, v: Tensor, theta: Tensor
) -> Tensor:
    """Differentiable ``log det H`` ``(G,)`` of the sparse form.

    Arguments as in :func:`laplace_sparse`; gradients flow to ``W``, ``v`` and ``theta``. The
    native op :func:`laplace_sparse_logdet_grad` computes the gradients with the value, and its
    registered autograd formula uses them (first derivatives only: a second derivative raises);
    the reference path differentiates the dense log-determinant by autograd.
    """
    _check_W(W)
    crow, col, val = check_csr(crow, col, val)
    if has_native_kernel("laplace_sparse_logdet_grad", W.device):
        return torch.ops.splisosm.laplace_sparse_logdet_grad(W, crow, col, val, v, theta)[0]
    _check_reference_inputs(W, v=v, theta=theta, open_theta=True, csr_size=crow.numel() - 1)
    return laplace_sparse_logdet_reference(W, crow, col, val, v, theta)


def sparse_shifted_solve(
    crow: Tensor,
    col: Tensor,
    val: Tensor,
    scale: Tensor,
    shift: Tensor,
    rhs: Tensor,
    *,
    trace_inverse: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Solve ``(scale_g Q + shift_g I) x = rhs_g`` and return ``log det`` of that matrix.

    Parameters
    ----------
    crow, col, val
        CSR arrays of ``Q`` (``val`` float64).
    scale, shift
        ``(G,)``, ``scale > 0`` and ``shift >= 0``.
    rhs
        ``(G, R, n)`` (``R`` may be 0 for the log-determinant alone).
    trace_inverse
        Also return ``tr (scale_g Q + shift_g I)^-1`` (selected inversion of the same factor),
        which the derivatives of the prior terms need.

    Returns
    -------
    x, logdet[, trace]
        ``(G, R, n)``, ``(G,)`` and with ``trace_inverse`` ``(G,)``, in the dtype of ``rhs``.

    Notes
    -----
    The native kernel keeps the factors of recently solved systems (up to 512 MiB for the
    process, oldest dropped first) and reuses them when the same ``Q``, ``scale`` and ``shift``
    come again, as they do in the prior terms before and after a Newton step.
    """
    crow, col, val = check_csr(crow, col, val)
    trace_inverse = bool(trace_inverse)
    if has_native_kernel("sparse_shifted_solve", val.device):
        out = torch.ops.splisosm.sparse_shifted_solve(crow, col, val, scale, shift, rhs,
                                                      trace_inverse)
    else:
        _check_reference_inputs(rhs=rhs, scale=scale, shift=shift, csr_size=crow.numel() - 1)
        out = sparse_shifted_solve_reference(crow, col, val, scale, shift, rhs, trace_inverse)
    return out if trace_inverse else out[:2]


def sparse_inverse_diagonal(crow: Tensor, col: Tensor, val: Tensor) -> Tensor:
    """``diag(M^-1)`` ``(n,)`` of a sparse symmetric positive definite CSR matrix ``M``.

    Uses one supernodal sparse Cholesky factor and selected inversion (the entries of ``M^-1``
    on the factor's pattern, computed supernode by supernode from the last) instead of ``n``
    solves.
    """
    crow, col, val = check_csr(crow, col, val)
    if has_native_kernel("sparse_inverse_diagonal", val.device):
        return torch.ops.splisosm.sparse_inverse_diagonal(crow, col, val)
    return sparse_inverse_diagonal_reference(crow, col, val)


def _solve_eig_fake(W, rhs, evals, evecs, v, theta, tol, max_iter):
    return rhs.new_empty(rhs.shape), W.new_empty(W.shape[0], dtype=torch.int64)


def _logdet_eig_fake(W, evals, evecs, v, theta):
    return W.new_empty(W.shape[0])


def _lowrank_fake(W, rhs, evals, evecs, v, theta):
    return rhs.new_empty(rhs.shape), W.new_empty(W.shape[0])


def _sparse_fake(W, rhs, crow, col, val, v, theta):
    return rhs.new_empty(rhs.shape), W.new_empty(W.shape[0])


def _sparse_logdet_grad_fake(W, crow, col, val, v, theta):
    return W.new_empty(W.shape[0]), W.new_empty(W.shape), v.new_empty(v.shape), \
        theta.new_empty(theta.shape)


def _shifted_fake(crow, col, val, scale, shift, rhs, trace_inverse=False):
    G = rhs.shape[0]
    return rhs.new_empty(rhs.shape), rhs.new_empty(G), rhs.new_empty(G if trace_inverse else 0)


def _inverse_diagonal_fake(crow, col, val):
    return val.new_empty(crow.shape[0] - 1)


def _sparse_logdet_grad_setup_context(ctx, inputs, output) -> None:
    _, grad_W, grad_v, grad_theta = output
    ctx.save_for_backward(grad_W, grad_v, grad_theta)
    # the gradients are outputs of the op, not differentiable themselves
    ctx.mark_non_differentiable(grad_W, grad_v, grad_theta)


@torch.autograd.function.once_differentiable
def _sparse_logdet_grad_backward(ctx, grad: Tensor, *_: Tensor):
    """Vector-Jacobian product of ``logdet`` from the gradients the op computed with it."""
    grad_W, grad_v, grad_theta = ctx.saved_tensors
    need_W, _, _, _, need_v, need_theta = ctx.needs_input_grad
    return (grad[:, None, None, None] * grad_W if need_W else None, None, None, None,
            grad[:, None] * grad_v if need_v else None,
            grad[:, None] * grad_theta if need_theta else None)


if NATIVE_AVAILABLE:
    for _name, _fake in (
        ("laplace_solve_eig", _solve_eig_fake),
        ("laplace_logdet_eig", _logdet_eig_fake),
        ("laplace_lowrank", _lowrank_fake),
        ("laplace_sparse", _sparse_fake),
        ("laplace_sparse_logdet_grad", _sparse_logdet_grad_fake),
        ("sparse_shifted_solve", _shifted_fake),
        ("sparse_inverse_diagonal", _inverse_diagonal_fake),
    ):
        torch.library.register_fake(f"splisosm::{_name}")(_fake)
    torch.library.register_autograd(
        "splisosm::laplace_sparse_logdet_grad", _sparse_logdet_grad_backward,
        setup_context=_sparse_logdet_grad_setup_context,
    )
