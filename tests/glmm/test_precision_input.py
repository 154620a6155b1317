"""A user's sparse precision is taken when symmetric up to round-off, whatever its pattern."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from helpers import reference_models as ref
from splisosm.glmm.isomodels import IsoFullModel
from splisosm.glmm.laplace import SYMMETRY_RTOL, LaplaceSystem, symmetric_precision

D = torch.float64


@pytest.fixture(scope="module")
def kernel():
    return ref.car_kernel(4)


def _clean(K):
    P = np.linalg.inv(K)
    P[np.abs(P) < 1e-10 * np.abs(P).max()] = 0.0
    return sp.csr_matrix((P + P.T) / 2)


def test_one_sided_roundoff_is_symmetrised(kernel):
    noisy = ref.roundoff_precision(kernel)
    assert (noisy != noisy.T).nnz > 0  # the input really is asymmetric in pattern
    sym = symmetric_precision(noisy, noisy.shape[0])
    assert (sym != sym.T).nnz == 0
    assert np.array_equal(sym.indptr, sym.T.tocsr().indptr)
    # one-sided entries below round-off and explicit zeros do not change the matrix
    np.testing.assert_allclose(sym.toarray(), _clean(kernel).toarray(), rtol=0, atol=1e-16)


def test_last_bit_differences_are_averaged(kernel):
    P = _clean(kernel).toarray()
    P[3, 2] *= 1 + 1e-14
    sym = symmetric_precision(sp.csr_matrix(P), P.shape[0])
    assert sym[3, 2] == sym[2, 3]


def test_models_fit_the_same_with_a_noisy_precision(kernel):
    Y = ref.simulate_counts(kernel, 2, 3, seed=6)
    fits = []
    for Q in (_clean(kernel), ref.roundoff_precision(kernel)):
        model = IsoFullModel(dtype=D, fitting_method="marginal_newton",
                             fitting_configs={"max_epochs": 5})
        model.setup_data(Y, corr_sp_precision=Q)
        model.fit(quiet=True)
        fits.append(model)
    for name in ("nu", "sigma", "theta_logit"):
        torch.testing.assert_close(getattr(fits[0], name), getattr(fits[1], name), rtol=1e-10,
                                   atol=1e-12)


def test_laplace_system_accepts_the_noisy_precision(kernel):
    n = kernel.shape[0]
    W = torch.eye(1, dtype=D).expand(1, n, 1, 1).contiguous()
    v = torch.full((1, 1), 0.8, dtype=D)
    t = torch.full((1, 1), 0.4, dtype=D)
    clean = LaplaceSystem(n, precision=_clean(kernel)).logdet(W, v, t)
    noisy = LaplaceSystem(n, precision=ref.roundoff_precision(kernel)).logdet(W, v, t)
    torch.testing.assert_close(noisy, clean, rtol=1e-12, atol=0)


def test_a_really_asymmetric_precision_is_rejected_by_name(kernel):
    P = _clean(kernel).toarray()
    P[0, 5] += 1e-6 * np.abs(P).max()
    assert 1e-6 > SYMMETRY_RTOL
    model = IsoFullModel(dtype=D)
    Y = ref.simulate_counts(kernel, 1, 2, seed=1)
    with pytest.raises(ValueError, match="`corr_sp_precision` must be symmetric"):
        model.setup_data(Y, corr_sp_precision=sp.csr_matrix(P))
    with pytest.raises(ValueError, match="`precision` must be symmetric"):
        LaplaceSystem(P.shape[0], precision=sp.csr_matrix(P))


@pytest.mark.parametrize("bad,match", [
    (np.eye(16), "scipy sparse"),
    (sp.eye(15, format="csr"), r"shape \(16, 16\)"),
    (sp.csr_matrix(np.diag([np.nan] + [1.0] * 15)), "non-finite"),
])
def test_other_bad_precisions_name_the_argument(kernel, bad, match):
    model = IsoFullModel(dtype=D)
    with pytest.raises(ValueError, match=f"`corr_sp_precision`.*{match}|{match}.*"):
        model.setup_data(ref.simulate_counts(kernel, 1, 2, seed=1), corr_sp_precision=bad)
