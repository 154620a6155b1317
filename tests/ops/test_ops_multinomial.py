"""Parity of the native multinomial ops with their pure-torch references, plus opcheck/gradcheck."""

from __future__ import annotations

import pytest
import torch

from helpers.ops_inputs import random_multinom_inputs
from splisosm import ops

SHAPES = [(1, 1, 2), (3, 7, 2), (2, 50, 3), (4, 33, 6), (1, 200, 9), (5, 1, 4)]


def _native_only():
    if not ops.NATIVE_AVAILABLE:
        pytest.fail("the compiled extension splisosm._C is not importable")


@pytest.mark.parametrize("G,n,m", SHAPES)
def test_multinom_terms_matches_reference_float64(G, n, m):
    _native_only()
    eta, counts = random_multinom_inputs(G, n, m)
    counts[:, ::3] = 0  # zero-count spots
    got = torch.ops.splisosm.multinom_terms(eta, counts)
    want = ops.multinom_terms_reference(eta, counts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-11)


@pytest.mark.parametrize("m", [2, 4])  # m = 2 has its own kernel
def test_multinom_terms_extreme_eta_is_stable(m):
    eta, counts = random_multinom_inputs(2, 40, m)
    eta = eta.sign() * 100.0 + eta  # |eta| around 100
    got = torch.ops.splisosm.multinom_terms(eta, counts)
    want = ops.multinom_terms_reference(eta, counts)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("m", [2, 3])
def test_multinom_terms_large_and_fractional_counts_use_lgamma(m):
    eta, counts = random_multinom_inputs(2, 10, m)
    counts[0, 0, 0] = 5000.0  # beyond the log-factorial table
    counts[0, 2, :2] = torch.tensor([3000.0, 2000.0])  # each count inside, their total beyond
    counts[1, 1, 1] = 2.5  # not an integer
    counts[1, 3, 0] = -0.0
    got = torch.ops.splisosm.multinom_terms(eta, counts)
    want = ops.multinom_terms_reference(eta, counts)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("G,n,m", [(3, 50, 2), (2, 64, 5)])
def test_multinom_terms_float32_within_tolerance(G, n, m):
    eta, counts = random_multinom_inputs(G, n, m, dtype=torch.float32)
    got = torch.ops.splisosm.multinom_terms(eta, counts)
    want = ops.multinom_terms_reference(eta.double(), counts.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-3)


def test_multinom_terms_loglik_matches_direct_formula():
    """Independent check against the multinomial pmf (SPEC §5.1)."""
    eta, counts = random_multinom_inputs(1, 5, 3)
    ll, _, _ = ops.multinom_terms(eta, counts)
    p = ops.multinom_probs(eta)[0]
    expect = 0.0
    for s in range(5):
        dist = torch.distributions.Multinomial(int(counts[0, s].sum()), probs=p[s])
        expect += float(dist.log_prob(counts[0, s]))
    assert abs(float(ll[0]) - expect) < 1e-9


@pytest.mark.parametrize("G,n,m,P", [(1, 1, 2, 0), (3, 20, 2, 1), (2, 40, 4, 3), (2, 17, 7, 2)])
def test_fixed_effect_info_matches_reference(G, n, m, P):
    eta, counts = random_multinom_inputs(G, n, m)
    _, resid, W = ops.multinom_terms_reference(eta, counts)
    X = torch.randn(n, P, dtype=torch.float64)
    got = torch.ops.splisosm.fixed_effect_info(X, W, resid)
    want = ops.fixed_effect_info_reference(X, W, resid)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)


def test_fixed_effect_info_layout_is_isoform_major():
    """info[j*(P+1)+f, k*(P+1)+h] = sum_s W_s[j,k] x~_sf x~_sh, intercept last."""
    eta, counts = random_multinom_inputs(1, 6, 3)
    _, resid, W = ops.multinom_terms_reference(eta, counts)
    X = torch.randn(6, 2, dtype=torch.float64)
    info, score = ops.fixed_effect_info(X, W, resid)
    Xt = torch.cat([X, torch.ones(6, 1, dtype=X.dtype)], 1)
    j, f, k, h = 1, 0, 0, 2
    expect = sum(W[0, s, j, k] * Xt[s, f] * Xt[s, h] for s in range(6))
    torch.testing.assert_close(info[0, j * 3 + f, k * 3 + h], expect)
    torch.testing.assert_close(score[0, 1 * 3 + 2], resid[0, :, 1].sum())


def test_fixed_effect_info_float32():
    eta, counts = random_multinom_inputs(4, 300, 3, dtype=torch.float32)
    _, resid, W = ops.multinom_terms(eta, counts)
    X = torch.randn(300, 2)
    got = ops.fixed_effect_info(X, W, resid)
    want = ops.fixed_effect_info_reference(X.double(), W.double(), resid.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-2)


def test_opcheck_multinom_terms():
    eta, counts = random_multinom_inputs(2, 9, 3)
    torch.library.opcheck(torch.ops.splisosm.multinom_terms.default, (eta.requires_grad_(), counts))
    torch.library.opcheck(torch.ops.splisosm.multinom_terms.default, (eta.detach().float(), counts.float()))


def test_opcheck_fixed_effect_info():
    eta, counts = random_multinom_inputs(2, 9, 3)
    _, resid, W = ops.multinom_terms_reference(eta, counts)
    X = torch.randn(9, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.splisosm.fixed_effect_info.default, (X, W, resid))


def test_gradcheck_all_outputs():
    eta, counts = random_multinom_inputs(2, 6, 4)
    eta.requires_grad_()
    assert torch.autograd.gradcheck(lambda e: ops.multinom_terms(e, counts), (eta,))


def test_autograd_matches_reference_autograd():
    eta, counts = random_multinom_inputs(3, 11, 3)
    weights = [torch.randn(3, dtype=torch.float64), torch.randn(3, 11, 2, dtype=torch.float64),
               torch.randn(3, 11, 2, 2, dtype=torch.float64)]
    grads = []
    for fn in (ops.multinom_terms, ops.multinom_terms_reference):
        e = eta.clone().requires_grad_()
        out = fn(e, counts)
        sum(float(0) + (o * w).sum() for o, w in zip(out, weights)).backward()
        grads.append(e.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


def test_reference_fallback_is_used_when_forced():
    eta, counts = random_multinom_inputs(2, 5, 3)
    with ops.use_reference():
        assert not ops.has_native_kernel("multinom_terms", eta.device)
        got = ops.multinom_terms(eta, counts)
    assert ops.has_native_kernel("multinom_terms", eta.device)
    for a, b in zip(got, ops.multinom_terms_reference(eta, counts)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda e, c: (e[0], c), "eta"),
        (lambda e, c: (e, c[..., :-1]), "counts"),
        (lambda e, c: (e, c[:, :-1]), "counts"),
        (lambda e, c: (e, c.float()), "counts"),
        (lambda e, c: (e.int(), c.int()), "eta"),
        (lambda e, c: (e, c.index_fill(1, torch.tensor([0]), -1.0)), "negative"),
        (lambda e, c: (e, c.index_fill(1, torch.tensor([0]), float("nan"))), "NaN"),
        (lambda e, c: (e, c.index_fill(1, torch.tensor([0]), float("inf"))), "infinite"),
    ],
)
@pytest.mark.parametrize("m", [2, 3])
def test_multinom_terms_bad_inputs_name_the_argument(native, mutate, match, m):
    eta, counts = random_multinom_inputs(2, 5, m)
    bad_eta, bad_counts = mutate(eta, counts)
    if native:
        with pytest.raises((RuntimeError, ValueError), match=match):
            torch.ops.splisosm.multinom_terms(bad_eta, bad_counts)
    # Shape/dtype problems are caught by the wrapper (ValueError); value problems by whichever
    # kernel runs (the native one reports through TORCH_CHECK, a RuntimeError).
    with pytest.raises((ValueError, RuntimeError), match=match), ops.use_reference(not native):
        ops.multinom_terms(bad_eta, bad_counts)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda X, W, r: (X[:-1], W, r), "X"),
        (lambda X, W, r: (X, W[..., :1], r), "W"),
        (lambda X, W, r: (X, W, r[:, :-1]), "resid"),
        (lambda X, W, r: (X.float(), W, r), "X"),
    ],
)
def test_fixed_effect_info_bad_inputs_name_the_argument(mutate, match):
    eta, counts = random_multinom_inputs(2, 5, 3)
    _, resid, W = ops.multinom_terms_reference(eta, counts)
    X = torch.randn(5, 2, dtype=torch.float64)
    args = mutate(X, W, resid)
    with pytest.raises(ValueError, match=match):
        ops.fixed_effect_info(*args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.splisosm.fixed_effect_info(*args)
