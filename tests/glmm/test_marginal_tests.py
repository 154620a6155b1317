"""Marginal score tests (DU 'marginal-score', SV 'score') and the chi-bar-square reference.

The structured computations are checked against dense restatements of the same formulas on
small random problems; the calibration checks live in test_calibration.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2, norm

from helpers.glmm_data import make_adata
from splisosm.glmm import _marginal
from splisosm.glmm.laplace import LaplaceSystem
from splisosm.glmm.stats import chibar2_pvalues
from splisosm.hyptest_glmm import SplisosmGLMM
from splisosm.ops import multinom_terms
from splisosm.spatial.kernel import SpatialCovKernel

N, Q = 24, 2


def _kernel(n: int = N) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    coords = np.random.default_rng(0).uniform(0, 5, size=(n, 2))
    kernel = SpatialCovKernel(coords, k_neighbors=4, rho=0.9)
    lam, U = kernel.eigenpairs(n)
    return kernel.K_sp.double(), lam.double(), U.double()


def _problem(G: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.poisson(torch.full((G, N, Q + 1), 3.0, dtype=torch.float64), generator=gen)
    nu = 0.3 * torch.randn(G, N, Q, generator=gen, dtype=torch.float64)
    bias = 0.2 * torch.randn(G, Q, generator=gen, dtype=torch.float64)
    X = torch.randn(N, 2, generator=gen, dtype=torch.float64)
    return counts, nu, bias, X


def _blockdiag_spots(blocks: torch.Tensor) -> torch.Tensor:
    """``(n, q, q)`` per-spot blocks as the dense ``(n q, n q)`` matrix, index ``j * n + s``."""
    n, q, _ = blocks.shape
    dense = torch.zeros(q * n, q * n, dtype=blocks.dtype)
    idx = torch.arange(n)
    for j in range(q):
        for k in range(q):
            dense[j * n + idx, k * n + idx] = blocks[:, j, k]
    return dense


def _column_design(Xt: torch.Tensor, q: int) -> torch.Tensor:
    """``Xt (x) I_q`` in the ``j * n + s`` row layout, columns ``f * q + l``."""
    n, p = Xt.shape
    X0 = torch.zeros(q * n, p * q, dtype=Xt.dtype)
    for f in range(p):
        for j in range(q):
            X0[j * n:(j + 1) * n, f * q + j] = Xt[:, f]
    return X0


def test_chibar2_pvalues() -> None:
    stat = np.array([0.0, -1.0, 0.5, 3.84, 9.0])
    np.testing.assert_allclose(chibar2_pvalues(stat, 1), np.r_[1, 1, 0.5 * chi2.sf(stat[2:], 1)])
    two = chibar2_pvalues(stat, 2)
    expected = 0.5 * chi2.sf(stat[2:], 1) + 0.25 * chi2.sf(stat[2:], 2)
    np.testing.assert_allclose(two, np.r_[1, 1, expected])
    mixed = chibar2_pvalues(stat[2:4], np.array([1, 2]))
    np.testing.assert_allclose(mixed, [0.5 * chi2.sf(0.5, 1), expected[1]])


def test_null_mode_is_stationary() -> None:
    counts, nu, bias, X = _problem()
    v = torch.tensor([[0.4, 0.7], [0.2, 0.2], [1.0, 0.5]], dtype=torch.float64)
    Xt = _marginal.with_intercept(X, N, counts)
    omega = torch.zeros(3, Xt.shape[1], Q, dtype=torch.float64)
    omega[:, -1] = bias
    nu_hat, om_hat = _marginal.null_mode(counts, nu, omega, v, Xt)
    _, r, _ = multinom_terms(nu_hat + torch.einsum("sf,gfj->gsj", Xt, om_hat), counts)
    assert (r - nu_hat / v[:, None, :]).abs().max() < 1e-7
    assert torch.einsum("sf,gsj->gfj", Xt, r).abs().max() < 1e-7
    assert (nu_hat - nu).abs().max() > 1e-2  # it did move from the start


def test_score_moments_match_dense() -> None:
    K, lam, U = _kernel()
    counts, nu, _, X = _problem()
    _, _, W = multinom_terms(nu, counts)
    v = torch.tensor([0.5, 0.8], dtype=torch.float64).expand(3, Q)
    _, D = _marginal._null_precision(W, v)
    Xt = _marginal.with_intercept(X, N, counts)
    traces = _marginal.score_moments(D, Xt, lam, U)
    X0 = _column_design(Xt, Q)
    Kbig = torch.block_diag(*[K] * Q)
    for g in range(3):
        Dg = _blockdiag_spots(D[g])
        P = Dg - Dg @ X0 @ torch.linalg.solve(X0.T @ Dg @ X0, X0.T @ Dg)
        expected = {"pk": P @ Kbig, "pkpk": P @ Kbig @ P @ Kbig, "p": P, "pkp": P @ Kbig @ P,
                    "pp": P @ P}
        for name, dense in expected.items():
            got = getattr(traces, name)[g].item()
            assert got == pytest.approx(torch.trace(dense).item(), rel=1e-6), name
        # and D is the inverse of the per-spot working covariance W^-1 + v I
        Wg = _blockdiag_spots(W[g])
        Vinv = torch.linalg.inv(torch.linalg.inv(Wg) + torch.diag(v[g].repeat_interleave(N)))
        torch.testing.assert_close(Dg, Vinv, rtol=1e-8, atol=1e-10)


def test_sv_score_matches_dense() -> None:
    K, lam, U = _kernel()
    counts, nu, bias, X = _problem()
    v = torch.tensor([[0.4, 0.7], [0.2, 0.2], [1.0, 0.5]], dtype=torch.float64)
    Xt = _marginal.with_intercept(X, N, counts)
    omega = torch.zeros(3, Xt.shape[1], Q, dtype=torch.float64)
    omega[:, -1] = bias
    nu, omega = _marginal.null_mode(counts, nu, omega, v, Xt)
    res = _marginal.sv_score(counts, nu, omega, v, Xt, lam, U)
    _, r, W = multinom_terms(nu + torch.einsum("sf,gfj->gsj", Xt, omega), counts)
    _, D = _marginal._null_precision(W, v)
    X0 = _column_design(Xt, Q)
    Kbig = torch.block_diag(*[K] * Q)
    for g in range(3):
        Dg = _blockdiag_spots(D[g])
        P = Dg - Dg @ X0 @ torch.linalg.solve(X0.T @ Dg @ X0, X0.T @ Dg)
        rg = r[g].T.reshape(-1)
        phi = (rg @ rg / torch.trace(P)).item()
        a = (torch.trace(P @ Kbig) / torch.trace(P)).item()
        A = Kbig - a * torch.eye(Q * N, dtype=torch.float64)
        assert res["statistic"][g] == pytest.approx((rg @ Kbig @ rg).item(), rel=1e-8)
        assert res["phi"][g] == pytest.approx(phi, rel=1e-8)
        assert res["mean"][g] == pytest.approx(a * (rg @ rg).item(), rel=1e-8)
        assert res["variance"][g] == pytest.approx(
            phi ** 2 * 2 * torch.trace(P @ A @ P @ A).item(), rel=1e-6)
    z = (res["statistic"] - res["mean"]) / np.sqrt(res["variance"])
    np.testing.assert_allclose(res["pvalue"], _marginal.three_moment_sf(z, res["skewness"]))


@pytest.mark.parametrize("shift", [0.0, 0.9, 3.0])
def test_spectral_skewness_matches_dense_cumulants(shift) -> None:
    K, lam, U = _kernel()
    block = torch.tensor([[0.8, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    D = block.expand(1, N, Q, Q)
    got = _marginal.spectral_skewness(lam[:-3], N, torch.tensor([shift], dtype=torch.float64), D)
    # the truncated kernel: its last three eigenvalues are zero
    lowrank = (U[:, :-3] * lam[:-3]) @ U[:, :-3].T
    A = _blockdiag_spots(D[0]) @ torch.kron(torch.eye(Q, dtype=torch.float64),
                                            lowrank - shift * torch.eye(N, dtype=torch.float64))
    k2, k3 = 2 * torch.trace(A @ A), 8 * torch.trace(A @ A @ A)
    assert got.item() == pytest.approx((k3 / k2 ** 1.5).item(), rel=1e-8)


def test_three_moment_sf_is_the_standardised_chi_square() -> None:
    df = 5.0
    x = np.array([0.5, 3.0, 11.0])
    z = (x - df) / np.sqrt(2 * df)
    skew = np.sqrt(8 / df)
    np.testing.assert_allclose(_marginal.three_moment_sf(z, skew), chi2.sf(x, df), rtol=1e-12)
    # a negative skewness mirrors it, and no skewness gives the normal tail
    np.testing.assert_allclose(_marginal.three_moment_sf(-z, -skew), chi2.cdf(x, df), rtol=1e-12)
    np.testing.assert_allclose(_marginal.three_moment_sf(z, 0.0), norm.sf(z), atol=1e-3)


def test_kernel_square_apply_in_blocks(monkeypatch) -> None:
    K, lam, U = _kernel()
    vecs = torch.randn(N, 5, dtype=torch.float64)
    monkeypatch.setattr(_marginal, "KERNEL_ROW_BLOCK", 7)  # several row blocks, a ragged last one
    torch.testing.assert_close(_marginal._kernel_square_apply(lam, U, vecs), (K * K) @ vecs)


def test_du_marginal_score_matches_dense() -> None:
    K, lam, U = _kernel()
    counts, nu, bias, X = _problem()
    v = torch.tensor([[0.4, 0.7], [0.2, 0.2], [1.0, 0.5]], dtype=torch.float64)
    theta = torch.tensor([[0.3, 0.6], [0.1, 0.1], [0.8, 0.5]], dtype=torch.float64)
    fixed = bias[:, None, :].expand(3, N, Q)
    system = LaplaceSystem(N, evals=lam, evecs=U)
    stat = _marginal.du_marginal_score(X, counts, nu, fixed, v, theta, system)
    _, r, W = multinom_terms(nu + fixed, counts)
    Xt = _marginal.with_intercept(X, N, counts)
    Y0 = _column_design(Xt, Q)
    p = Xt.shape[1]
    for g in range(3):
        Wg = _blockdiag_spots(W[g])
        Sigma = torch.block_diag(*[v[g, j] * (theta[g, j] * K + (1 - theta[g, j]) * torch.eye(N))
                                   for j in range(Q)])
        Vinv = torch.linalg.inv(torch.linalg.inv(Wg) + Sigma)
        info = Y0.T @ Vinv @ Y0
        score = Y0.T @ r[g].T.reshape(-1)
        zero = slice((p - 1) * Q, p * Q)
        for f in range(p - 1):
            F = slice(f * Q, (f + 1) * Q)
            A = info[F, zero] @ torch.linalg.inv(info[zero, zero])
            eff_info = info[F, F] - A @ info[zero, F]
            eff_score = score[F] - A @ score[zero]
            expected = eff_score @ torch.linalg.solve(eff_info, eff_score)
            assert stat[g, f] == pytest.approx(expected.item(), rel=1e-6)


def test_du_marginal_score_glm_is_efficient_conditional_score() -> None:
    counts, _, bias, X = _problem()
    fixed = bias[:, None, :].expand(3, N, Q)
    stat = _marginal.du_marginal_score(X, counts, torch.zeros_like(fixed), fixed, None, None, None)
    _, r, W = multinom_terms(fixed, counts)
    Xt = _marginal.with_intercept(X, N, counts)
    Y0 = _column_design(Xt, Q)
    info = Y0.T @ _blockdiag_spots(W[0]) @ Y0
    score = Y0.T @ r[0].T.reshape(-1)
    F, zero = slice(0, Q), slice(2 * Q, 3 * Q)
    A = info[F, zero] @ torch.linalg.inv(info[zero, zero])
    eff = score[F] - A @ score[zero]
    expected = eff @ torch.linalg.solve(info[F, F] - A @ info[zero, F], eff)
    assert stat[0, 0] == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------ facade
@pytest.fixture(scope="module")
def fitted() -> SplisosmGLMM:
    model = SplisosmGLMM(fitting_method="marginal_newton", fitting_configs={"max_epochs": 30})
    model.setup_data(make_adata(du_effect=[2.0, 0, 0, 0]), group_gene_by_n_iso=True,
                     design_mtx=["cov", "flag"])
    model.fit(from_null=True, batch_size=2, print_progress=False, random_seed=0)
    return model


def test_sv_score_results(fitted) -> None:
    res = fitted.test_spatial_variability(method="score", return_results=True, print_progress=False)
    assert res["method"] == "score" and not res["use_perm_null"]
    assert res["statistic"].shape == (4,) and res["statistic"].dtype == np.float32
    assert res["pvalue"].dtype == np.float64 and ((res["pvalue"] > 0) & (res["pvalue"] <= 1)).all()
    table = fitted.get_formatted_test_results("sv")
    np.testing.assert_allclose(table["pvalue"], res["pvalue"])
    with pytest.raises(ValueError, match="use_perm_null"):
        fitted.test_spatial_variability(method="score", use_perm_null=True)


def test_sv_score_from_a_white_noise_model_alone(fitted, tmp_path) -> None:
    """A 'glmm-null' model fits only the white-noise models and gives the same score test."""
    null = SplisosmGLMM(model_type="glmm-null", fitting_method="marginal_newton",
                        fitting_configs={"max_epochs": 30})
    null.setup_data(make_adata(du_effect=[2.0, 0, 0, 0]), group_gene_by_n_iso=True,
                    design_mtx=["cov", "flag"])
    with pytest.raises(ValueError, match=r"call fit\(\) first"):
        null.test_spatial_variability(method="score")
    null.fit(batch_size=2, print_progress=False, random_seed=0)
    got = null.test_spatial_variability(method="score", return_results=True, print_progress=False)
    expected = fitted.test_spatial_variability(method="score", return_results=True,
                                               print_progress=False)
    np.testing.assert_allclose(got["pvalue"], expected["pvalue"], rtol=1e-6)
    np.testing.assert_allclose(got["statistic"], expected["statistic"], rtol=1e-5)
    # a restored model has no coordinates to build the kernel from
    null.save(tmp_path / "null.splisosm")
    restored = SplisosmGLMM.load(tmp_path / "null.splisosm")
    with pytest.raises(ValueError, match=r"setup_data\(\) again"):
        restored.test_spatial_variability(method="score")


def test_sv_score_needs_white_noise_fits() -> None:
    glm = SplisosmGLMM(model_type="glm", fitting_configs={"max_epochs": 5})
    glm.setup_data(make_adata(), group_gene_by_n_iso=True)
    glm.fit(print_progress=False)
    with pytest.raises(ValueError, match="model_type='glmm-null'"):
        glm.test_spatial_variability(method="score")
    full = SplisosmGLMM(fitting_configs={"max_epochs": 5})
    full.setup_data(make_adata(), group_gene_by_n_iso=True)
    full.fit(print_progress=False)
    with pytest.raises(ValueError, match="from_null=True"):
        full.test_spatial_variability(method="score")


def test_llr_after_joint_fit_warns() -> None:
    model = SplisosmGLMM(fitting_configs={"max_epochs": 10})
    model.setup_data(make_adata(), group_gene_by_n_iso=True)
    model.fit(from_null=True, print_progress=False)
    with pytest.warns(UserWarning, match="marginal_newton"):
        model.test_spatial_variability(print_progress=False)


def test_du_marginal_score_results(fitted) -> None:
    res = fitted.test_differential_usage(method="marginal-score", return_results=True,
                                         print_progress=False)
    cond = fitted.test_differential_usage(method="score", return_results=True, print_progress=False)
    assert res["method"] == "marginal-score" and res["statistic"].shape == (4, 2)
    df = np.array(fitted.n_isos_per_gene)[:, None] - 1
    np.testing.assert_allclose(res["pvalue"].numpy(), chi2.sf(res["statistic"].numpy().astype(float), df),
                               rtol=1e-5)
    # the marginal information is smaller than the conditional one: larger statistics
    assert (res["statistic"] >= cond["statistic"] * 0.999).float().mean() > 0.5
    assert res["pvalue"][0, 0] < 1e-3  # gene 0 carries the simulated effect on 'cov'


def test_du_marginal_score_refuses_fits_with_design() -> None:
    model = SplisosmGLMM(model_type="glm")
    model.setup_data(make_adata(du_effect=[2.0, 0, 0, 0]), group_gene_by_n_iso=True, design_mtx=["cov"])
    model.fit(with_design_mtx=True, print_progress=False)
    with pytest.raises(ValueError, match="with_design_mtx=False"):
        model.test_differential_usage(method="marginal-score")
    model.fit(print_progress=False)
    res = model.test_differential_usage(method="marginal-score", return_results=True, print_progress=False)
    assert res["pvalue"][0, 0] < 1e-3
