"""Likelihood values of the GLMM/GLM against the dense restatements of SPEC §5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import reference_models as ref
from splisosm.glmm.glm import MultinomGLM
from splisosm.glmm.isomodels import IsoFullModel, IsoNullNoSpVar
from splisosm.glmm.model import MultinomGLMM

D = torch.float64


@pytest.fixture(scope="module")
def kernel():
    return ref.car_kernel(4)


def _perturbed(model: MultinomGLMM, seed: int = 1) -> MultinomGLMM:
    """Give every parameter a non-trivial value so all terms matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "theta_logit" and not torch.isfinite(p).all():
                continue
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _ref_kwargs(model, g, **extra):
    return dict(Y=model.counts[g], X=model.X, nu=model.nu[g].detach(), beta=model.beta[g].detach(),
                bias=model.bias_eta[g].detach(), sigma=model.sigma[g].detach(),
                theta_logit=model.theta_logit[g].detach(), prior=model.var_prior_model,
                prior_params=model.var_prior_model_params, **extra)


def _ref_joint(model, g, **extra):
    kw = _ref_kwargs(model, g, **extra)
    return ref.joint_loglik(kw.pop("Y"), kw.pop("X"), kw.pop("nu"), kw.pop("beta"),
                            kw.pop("bias"), kw.pop("sigma"), kw.pop("theta_logit"), **kw)


def _ref_marginal(model, g, **extra):
    kw = _ref_kwargs(model, g, **extra)
    return ref.marginal_loglik(kw.pop("Y"), kw.pop("X"), kw.pop("nu"), kw.pop("beta"),
                               kw.pop("bias"), kw.pop("sigma"), kw.pop("theta_logit"), **kw)


@pytest.mark.parametrize("prior", ["none", "gamma", "inv_gamma"])
@pytest.mark.parametrize("share", [True, False])
def test_full_rank_joint_and_marginal(kernel, prior, share):
    Y = ref.simulate_counts(kernel, 2, 3, seed=3)
    X = torch.randn(16, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    model = IsoFullModel(share_variance=share, var_prior_model=prior, dtype=D)
    model.setup_data(Y, corr_sp=kernel, design_mtx=X)
    _perturbed(model)
    K = torch.from_numpy(kernel)
    with torch.no_grad():
        lj, lm = model.joint_loglik(), model.marginal_loglik()
    for g in range(2):
        torch.testing.assert_close(lj[g], _ref_joint(model, g, K=K), rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(lm[g], _ref_marginal(model, g, K=K), rtol=1e-10, atol=1e-8)


def test_low_rank_joint_and_marginal(kernel):
    lam, U = np.linalg.eigh(kernel)
    lam, U = lam[::-1][:6].copy(), U[:, ::-1][:, :6].copy()
    Y = ref.simulate_counts(kernel, 2, 3, seed=4)
    model = IsoFullModel(var_prior_model="inv_gamma", dtype=D)
    model.setup_data(Y, corr_sp_eigvals=lam, corr_sp_eigvecs=U)
    _perturbed(model)
    extra = {"U": torch.from_numpy(U), "lam": torch.from_numpy(lam)}
    with torch.no_grad():
        lj, lm = model.joint_loglik(), model.marginal_loglik()
    for g in range(2):
        torch.testing.assert_close(lj[g], _ref_joint(model, g, **extra), rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(lm[g], _ref_marginal(model, g, **extra), rtol=1e-10, atol=1e-8)


def test_null_model_uses_white_noise(kernel):
    Y = ref.simulate_counts(kernel, 2, 4, seed=5)
    model = IsoNullNoSpVar(var_prior_model="gamma", dtype=D)
    model.setup_data(Y, corr_sp=kernel)
    _perturbed(model)
    assert torch.isinf(model.theta_logit).all() and not model.theta_logit.requires_grad
    K = torch.eye(16, dtype=D)  # theta = 0: Sigma = v I whatever K is
    with torch.no_grad():
        lj, lm = model.joint_loglik(), model.marginal_loglik()
    for g in range(2):
        kw = _ref_kwargs(model, g, K=K)
        kw["theta_logit"] = torch.tensor([-80.0], dtype=D)
        args = [kw.pop(k) for k in ("Y", "X", "nu", "beta", "bias", "sigma", "theta_logit")]
        torch.testing.assert_close(lj[g], ref.joint_loglik(*args, **kw), rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(lm[g], ref.marginal_loglik(*args, **kw), rtol=1e-10, atol=1e-8)


def test_sparse_precision_route_matches_dense(kernel):
    Y = ref.simulate_counts(kernel, 2, 3, seed=6)
    dense = IsoFullModel(dtype=D)
    dense.setup_data(Y, corr_sp=kernel)
    _perturbed(dense)
    sparse = IsoFullModel(dtype=D)
    sparse.setup_data(Y, corr_sp_precision=ref.roundoff_precision(kernel))
    sparse.update_params_from_dict(dict(dense.named_parameters()))
    assert sparse.corr_sp_eigvecs is None
    with torch.no_grad():
        torch.testing.assert_close(sparse.joint_loglik(), dense.joint_loglik(), rtol=1e-9, atol=0)
        torch.testing.assert_close(sparse.marginal_loglik(), dense.marginal_loglik(), rtol=1e-9,
                                   atol=0)


@pytest.mark.parametrize("m", [2, 6])
def test_edge_counts(kernel, m):
    Y = ref.simulate_counts(kernel, 2, m, seed=7)
    Y[0, :5] = 0  # zero-count spots
    Y[1] = 0
    Y[1, 3, 0] = 7  # a gene expressed in a single spot
    model = IsoFullModel(init_ratio="observed", dtype=D)
    model.setup_data(Y, corr_sp=kernel)
    K = torch.from_numpy(kernel)
    with torch.no_grad():
        lj, lm = model.joint_loglik(), model.marginal_loglik()
    assert torch.isfinite(lj).all() and torch.isfinite(lm).all()
    for g in range(2):
        torch.testing.assert_close(lj[g], _ref_joint(model, g, K=K), rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(lm[g], _ref_marginal(model, g, K=K), rtol=1e-10, atol=1e-8)


def test_single_spot():
    model = IsoFullModel(dtype=D)
    model.setup_data(torch.tensor([[3.0, 1.0, 2.0]], dtype=D), corr_sp=np.ones((1, 1)))
    assert model.n_spots == 1 and model.sigma.item() == pytest.approx(0.01)
    with torch.no_grad():
        expected = _ref_joint(model, 0, K=torch.ones(1, 1, dtype=D))
        torch.testing.assert_close(model.joint_loglik()[0], expected)


def test_initialisation(kernel):
    Y = ref.simulate_counts(kernel, 2, 3, seed=8)
    model = MultinomGLMM(init_ratio="observed", share_variance=False)
    model.setup_data(Y, corr_sp=kernel)
    assert model.nu.dtype == torch.float32 and model.nu.shape == (2, 16, 2)
    assert (model.nu == 0).all()
    pooled = Y.sum(1)
    torch.testing.assert_close(model.bias_eta.detach(),
                               torch.log((pooled[:, :2] + 0.5) / (pooled[:, 2:] + 0.5)).float())
    fano = Y.var(1).mean(-1) / Y.sum(-1).mean(-1).clamp(min=1)
    torch.testing.assert_close(model.sigma.detach(),
                               fano.clamp(1e-4, 0.9).sqrt()[:, None].expand(2, 2).float())
    assert (model.theta_logit == -3).all() and not model.sigma.requires_grad
    assert model.var_prior_model_params == {}
    inv = MultinomGLMM(var_prior_model="inv_gamma", var_prior_model_params={"beta": 0.2})
    assert inv.var_prior_model_params == {"alpha": 3.0, "beta": 0.2}


def test_setup_data_validation(kernel):
    Y = ref.simulate_counts(kernel, 1, 3)
    model = MultinomGLMM()
    with pytest.raises(ValueError):
        model.setup_data(Y[0, :, 0], corr_sp=kernel)
    with pytest.raises(NotImplementedError):
        model.setup_data(Y[..., :1], corr_sp=kernel)
    with pytest.raises(ValueError):
        model.setup_data(Y)
    with pytest.raises(ValueError):
        model.setup_data(Y, corr_sp_eigvals=np.ones(3), corr_sp_eigvecs=np.ones((16, 4)))
    with pytest.raises(ValueError):
        model.setup_data(Y, corr_sp=kernel, design_mtx=np.ones((2, 16, 1)))
    with pytest.raises(ValueError):
        model.setup_data(Y, corr_sp=kernel, device="cpu:0")
    with pytest.warns(UserWarning, match="ignored"):
        model.setup_data(Y, corr_sp=kernel, corr_sp_eigvals=np.ones(16),
                         corr_sp_eigvecs=np.eye(16))
    sparse_counts = Y[0].to_sparse()
    model.setup_data(sparse_counts, corr_sp=kernel)
    assert model.counts.shape == (1, 16, 3) and not model.counts.is_sparse


def test_small_variance_warns(kernel):
    model = MultinomGLMM()
    model.setup_data(ref.simulate_counts(kernel, 1, 3), corr_sp=kernel)
    model.update_params_from_dict({"sigma": torch.full((1, 1), 0.05)})
    with pytest.warns(UserWarning, match="close to zero"):
        model.forward()


def test_glm_loglik_and_ratio(kernel):
    Y = ref.simulate_counts(kernel, 2, 3, seed=9)
    X = torch.randn(16, 1, dtype=D, generator=torch.Generator().manual_seed(2))
    glm = MultinomGLM(dtype=D)
    glm.setup_data(Y, design_mtx=X)
    glm.update_params_from_dict({"beta": torch.full((2, 1, 2), 0.2),
                                 "bias_eta": torch.tensor([[0.1, -0.3], [0.0, 0.4]])})
    with torch.no_grad():
        ll = glm.forward()
        for g in range(2):
            eta = X @ glm.beta[g] + glm.bias_eta[g]
            torch.testing.assert_close(ll[g], ref.multinom_loglik(eta, Y[g]))
    ratio = glm.get_isoform_ratio()
    assert ratio.shape == (2, 16, 3)
    torch.testing.assert_close(ratio.sum(-1), torch.ones(2, 16, dtype=D))
    with pytest.raises(NotImplementedError):
        glm.setup_data(Y[..., :1])
    with pytest.raises(ValueError):
        glm.setup_data(Y, design_mtx=np.ones((3, 16, 1)))


def test_laplace_system_uses_the_given_float64_eigenpairs_without_a_copy(kernel):
    # every model of a dataset gets the same float64 arrays; a float32 model must not make a
    # float64 copy of its own (200 genes at 900 spots: +1.25 GB before)
    lam, V = np.linalg.eigh(kernel)
    lam, V = np.ascontiguousarray(lam[::-1]), np.ascontiguousarray(V[:, ::-1])
    Y = ref.simulate_counts(kernel, 1, 3, seed=6).float()
    model = IsoFullModel()
    model.setup_data(Y, corr_sp_eigvals=lam, corr_sp_eigvecs=V)
    assert model.corr_sp_eigvecs.dtype == torch.float32
    with torch.no_grad():
        model.marginal_loglik()
    assert np.shares_memory(model.system.inner._evecs.numpy(), V)
