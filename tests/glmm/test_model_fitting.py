"""Fitting methods of the GLMM/GLM against the dense restatements, plus the loop's bookkeeping."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import reference_models as ref
from splisosm.config import validate_glmm_config
from splisosm.glmm._fitting import PatienceLogger
from splisosm.glmm.glm import MultinomGLM
from splisosm.glmm.isomodels import IsoFullModel, IsoNullNoSpVar
from splisosm.glmm.model import MultinomGLMM

D = torch.float64
NAMES = ("nu", "beta", "bias_eta", "sigma", "theta_logit")


@pytest.fixture(scope="module")
def data():
    K = ref.car_kernel(4)
    Y = ref.simulate_counts(K, 2, 3, seed=11)
    X = torch.randn(16, 1, dtype=D, generator=torch.Generator().manual_seed(5))
    return K, Y, X


def _model(data, method="joint_gd", cls=IsoFullModel, genes=slice(None), **kw):
    K, Y, X = data
    configs = kw.pop("fitting_configs", {})
    model = cls(fitting_method=method, dtype=D, fitting_configs=configs, **kw)
    model.setup_data(Y[genes], corr_sp=K, design_mtx=X)
    return model


def _ref_batch_objective(model, marginal: bool, **kernel):
    fn = ref.marginal_loglik if marginal else ref.joint_loglik

    def objective(p):
        vals = [fn(model.counts[g], model.X, p["nu"][g], p["beta"][g], p["bias_eta"][g],
                   p["sigma"][g], p["theta_logit"][g], **kernel, prior=model.var_prior_model,
                   prior_params=model.var_prior_model_params)
                for g in range(model.n_genes)]
        return torch.stack(vals).sum()  # each gene descends its own objective
    return objective


LOW_RANK = 6


def _setup_form(model, data, form: str) -> dict:
    """Attach the data with the kernel in one of its forms; return the reference's kernel
    arguments. ``sparse``: full-rank eigenpairs plus the sparse precision (what SplisosmGLMM
    passes for n <= 5,000); ``precision``: the precision alone (its route above 5,000 spots)."""
    import numpy as np

    K, Y, X = data
    lam, V = np.linalg.eigh(K)
    lam, V = lam[::-1].copy(), V[:, ::-1].copy()
    Q = ref.roundoff_precision(K)
    if form == "dense":
        model.setup_data(Y, corr_sp=K, design_mtx=X)
    elif form == "sparse":
        model.setup_data(Y, corr_sp_eigvals=lam, corr_sp_eigvecs=V, corr_sp_precision=Q,
                         design_mtx=X)
    elif form == "precision":
        model.setup_data(Y, corr_sp_precision=Q, design_mtx=X)
    else:
        model.setup_data(Y, corr_sp_eigvals=lam[:LOW_RANK], corr_sp_eigvecs=V[:, :LOW_RANK],
                         design_mtx=X)
        return {"U": torch.from_numpy(V[:, :LOW_RANK]), "lam": torch.from_numpy(lam[:LOW_RANK])}
    return {"K": torch.from_numpy(K)}


@pytest.mark.parametrize("method,epochs", [("joint_gd", 12), ("marginal_gd", 3)])
@pytest.mark.parametrize("fix_sigma", [True, False])
@pytest.mark.parametrize("form", ["dense", "sparse", "precision", "low_rank"])
def test_gd_trajectory_matches_reference(data, method, epochs, fix_sigma, form):
    model = IsoFullModel(fitting_method=method, dtype=D, var_fix_sigma=fix_sigma,
                         var_prior_model="gamma",
                         fitting_configs={"max_epochs": epochs, "patience": 10**6})
    kernel_kw = _setup_form(model, data, form)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = model.fit(store_param_history=True, quiet=True)["params"]
    objective = _ref_batch_objective(model, method == "marginal_gd", **kernel_kw)
    expected = ref.fit_gd(objective, start, trainable, lr=model.fitting_configs["lr"],
                          epochs=epochs)
    for k in NAMES:
        torch.testing.assert_close(history[-1][k], expected[-1][k], rtol=1e-6, atol=1e-8)
    assert len(history) == epochs and model.logger.loss_history.shape == (epochs, 2)


def test_batched_and_single_gene_fits_agree(data):
    configs = {"max_epochs": 60}
    batch = _model(data, fitting_configs=configs)
    batch.fit(quiet=True)
    for g in range(2):
        single = _model(data, genes=slice(g, g + 1), fitting_configs=configs)
        single.fit(quiet=True)
        for k in NAMES:
            torch.testing.assert_close(getattr(single, k)[0], getattr(batch, k)[g], rtol=1e-5,
                                       atol=1e-6)


def test_joint_newton_reaches_the_conditional_mode(data):
    model = _model(data, "joint_newton", var_fix_sigma=False, var_prior_model="inv_gamma",
                   fitting_configs={"max_epochs": 30})
    before = model.joint_loglik().detach()
    model.fit(quiet=True)
    history = model.logger.loss_history
    # step halving: the joint objective never gets worse
    assert (history[1:] <= history[:-1] + 1e-9).all()
    assert (-history[0] >= before - 1e-9).all()
    K = torch.from_numpy(data[0])
    for g in range(2):
        kw = {"K": K, "prior": "inv_gamma", "prior_params": model.var_prior_model_params}
        args = (model.counts[g], model.X, model.nu[g].detach(), model.beta[g].detach(),
                model.bias_eta[g].detach(), model.sigma[g].detach(), model.theta_logit[g].detach())
        mode = ref.newton_mode(*args, **kw)
        best = ref.joint_loglik(args[0], args[1], *mode, args[5], args[6], **kw)
        got = ref.joint_loglik(*args, **kw)
        assert float(got) == pytest.approx(float(best), rel=1e-6)


def test_marginal_newton_reaches_the_laplace_optimum(data):
    model = _model(data, "marginal_newton", genes=slice(0, 1), fitting_configs={"max_epochs": 60})
    model.fit(quiet=True)
    K = torch.from_numpy(data[0])
    args = (model.counts[0], model.X, model.nu[0].detach(), model.beta[0].detach(),
            model.bias_eta[0].detach(), model.sigma[0].detach())

    def profile(t):
        return float(ref.profile_marginal(*args, torch.tensor([t], dtype=D), K=K))

    fitted = float(model.theta_logit.detach()[0, 0])
    _, best = ref.golden_max(profile, fitted - 0.5, fitted + 0.5, tol=1e-3)
    assert model.logger.converged.all()
    got = -float(model.logger.best_loss[0])
    assert got == pytest.approx(best, rel=1e-6)
    assert float(model.forward().detach()[0]) == pytest.approx(got, rel=1e-9)


@pytest.mark.parametrize("method", ["joint_gd", "marginal_gd"])
def test_lbfgs_fits_glmm(data, method):
    model = _model(data, method, fitting_configs={"optim": "lbfgs", "lr": 1.0, "max_epochs": 5})
    before = model.forward().detach()
    model.fit(quiet=True)
    assert (model.forward().detach() > before).all()


@pytest.mark.parametrize("method", ["iwls", "newton", "gd"])
def test_glm_methods_reach_the_mle(data, method):
    _, Y, X = data
    configs = {"max_epochs": 3000, "lr": 0.02, "patience": 50} if method == "gd" else None
    glm = MultinomGLM(method, configs, dtype=D)
    glm.setup_data(Y, design_mtx=X)
    glm.fit(quiet=True)
    rel = 2e-3 if method == "gd" else 1e-8  # gd stops by patience at tol 1e-5
    for g in range(2):
        best = float(ref.glm_fit(Y[g], X))
        assert float(glm.forward()[g]) == pytest.approx(best, rel=rel)
    assert glm.logger.converged.all()
    assert glm.logger.epoch < (50 if method != "gd" else 3000)


@pytest.mark.parametrize("method", ["iwls", "newton"])
def test_glm_float32_with_one_hot_design_collinear_with_intercept(data, method):
    """SPEC §3.7 one-hot encodes every level, so [X, 1] is rank deficient; only the ridge
    keeps the Newton system invertible, which float32 cannot resolve on its own."""
    _, Y, _ = data
    level = torch.arange(16) % 2
    X = torch.stack([level == 0, level == 1], 1).float()
    glm = MultinomGLM(method)
    glm.setup_data(Y.float(), design_mtx=X)
    glm.fit(quiet=True)
    assert torch.isfinite(glm.beta).all() and torch.isfinite(glm.bias_eta).all()
    reference = MultinomGLM(method, dtype=D)
    reference.setup_data(Y, design_mtx=X[:, :1].double())  # same model without the collinearity
    reference.fit(quiet=True)
    torch.testing.assert_close(glm.forward().double(), reference.forward(), rtol=1e-4, atol=1e-3)


def test_glm_lbfgs(data):
    _, Y, X = data
    glm = MultinomGLM("gd", {"optim": "lbfgs", "lr": 1.0, "max_epochs": 10})
    glm.setup_data(Y, design_mtx=X)
    glm.fit(quiet=True)
    assert float(glm.forward()[0]) == pytest.approx(float(ref.glm_fit(Y[0], X)), rel=1e-4)


def test_config_validation_at_construction():
    bad = [dict(fitting_method="newton"), dict(init_ratio="random"),
           dict(var_prior_model="lognormal"), dict(fitting_configs={"optim": "rmsprop"}),
           dict(fitting_method="joint_newton", var_fix_sigma=True)]
    for kwargs in bad:
        with pytest.raises(ValueError, match="valid"):
            MultinomGLMM(**kwargs)
    with pytest.raises(ValueError, match="valid"):
        IsoNullNoSpVar(fitting_method="joint_newton", var_fix_sigma=False)
    with pytest.raises(ValueError):
        MultinomGLM("iwls2")
    configs = validate_glmm_config(fitting_method="marginal_newton",
                                   fitting_configs={"max_epochs": -1, "patience": 0})
    assert configs == {"lr": 0.1, "optim": "adam", "tol": 1e-5, "tol_relative": False,
                       "max_epochs": 10000, "patience": 1, "update_nu_every_k": 3}
    assert MultinomGLMM(fitting_method="joint_newton", var_fix_sigma=False
                        ).fitting_configs["patience"] == 2


def test_patience_logger_is_nan_safe():
    logger = PatienceLogger(3, tol=0.1, patience=2)
    nan, inf = float("nan"), float("inf")
    logger.log(torch.tensor([5.0, nan, 5.0], dtype=D))
    logger.log(torch.tensor([4.0, nan, inf], dtype=D))
    assert logger.best_loss.tolist() == [4.0, inf, 5.0]
    assert logger.best_epoch.tolist() == [1, -1, 0]
    assert logger.stopped.tolist() == [False, True, False]
    assert logger.converged.tolist() == [False, False, False]
    logger.log(torch.tensor([3.95, 1.0, inf], dtype=D))
    logger.log(torch.tensor([3.95, 0.5, 4.0], dtype=D))
    # gene 0 converged by patience; gene 1 stopped while diverged and keeps its state;
    # gene 2 stopped at a non-finite loss: not reported as converged
    assert logger.converged.tolist() == [True, False, False]
    assert logger.stopped.all()
    assert logger.best_loss.tolist() == [3.95, inf, 5.0]
    assert torch.isinf(logger.loss_history[0, 1])


def test_nan_loss_warns_and_restores(data):
    model = _model(data, fitting_configs={"max_epochs": 5})
    with torch.no_grad():
        model.nu[1, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="Non-finite loss"):
        model.fit(quiet=True)
    assert not model.logger.converged[1] and torch.isinf(model.logger.best_loss[1])
    assert torch.isfinite(model.logger.best_loss[0])


def test_sigma_is_non_negative_after_restore(data):
    model = _model(data, var_fix_sigma=False, fitting_configs={"max_epochs": 3})
    model.update_params_from_dict({"sigma": -model.sigma.detach()})
    model.fit(quiet=True)
    assert (model.sigma >= 0).all()


def test_conversions(data):
    null = _model(data, "marginal_newton", cls=IsoNullNoSpVar,
                  fitting_configs={"max_epochs": 4, "tol": 1e-3})
    null.fit(quiet=True)
    full = IsoFullModel.from_trained_null(null)
    assert full.fitting_method == "marginal_newton" and full.logger is None
    assert full.fitting_configs["tol"] == 1e-3 and full.fitting_configs["lr"] == 0.1
    torch.testing.assert_close(full.nu, null.nu)
    torch.testing.assert_close(full.sigma.detach(), null.sigma.detach())  # fixed sigma kept
    assert (full.theta_logit == -3).all() and full.theta_logit.requires_grad
    full.update_params_from_dict({"theta_logit": torch.ones(2, 1)})
    back = IsoNullNoSpVar.from_trained_full(full)
    assert torch.isinf(back.theta_logit).all() and not back.theta_logit.requires_grad
    torch.testing.assert_close(back.sigma, full.sigma)

    jn = _model(data, "joint_newton", var_fix_sigma=False, fitting_configs={"patience": 3})
    to_null = IsoNullNoSpVar.from_trained_full(jn)
    assert to_null.fitting_method == "joint_gd"
    assert to_null.fitting_configs["patience"] == 5 and to_null.fitting_configs["lr"] == 0.01
    assert IsoFullModel.from_trained_null(to_null).fitting_method == "joint_gd"


def test_clone_and_history_alias(data):
    model = _model(data, fitting_configs={"max_epochs": 3})
    copy = model.clone()
    torch.testing.assert_close(copy.forward(), model.forward())
    assert copy.system is model.system and "IsoFullModel" in str(copy)
    with pytest.warns(DeprecationWarning):
        out = model.fit(diagnose=True, quiet=True)
    assert out["loss"].shape == (3, 2) and len(out["params"]) == 3
    assert model.fitting_time > 0 and model.n_factors == 1


@pytest.mark.parametrize("method", ["joint_gd", "marginal_gd", "marginal_newton", "joint_newton"])
def test_precision_only_fits_like_eigenpairs(data, method):
    K, Y, X = data
    configs = {"max_epochs": 6, "patience": 100}
    # joint_newton: the variance Hessian of the precision-only prior is a central difference of
    # its exact gradient; the steps, and so the parameters, agree to its accuracy
    kw = {"var_fix_sigma": False} if method == "joint_newton" else {}
    eig = _model(data, method, fitting_configs=configs, **kw)
    prec = IsoFullModel(fitting_method=method, dtype=D, fitting_configs=configs, **kw)
    prec.setup_data(Y, corr_sp_precision=ref.roundoff_precision(K), design_mtx=X)
    eig.fit(quiet=True)
    prec.fit(quiet=True)
    for k in NAMES:
        torch.testing.assert_close(getattr(prec, k), getattr(eig, k), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["joint_gd", "marginal_gd", "marginal_newton", "joint_newton"])
def test_edge_case_fits_stay_finite(method):
    # float32 parameters, six isoforms, a gene expressed in a single spot: the curvature blocks
    # of the extreme spots must stay usable by the structured solvers
    K = ref.car_kernel(4)
    Y = ref.simulate_counts(K, 2, 6, seed=3).float()
    Y[1] = 0
    Y[1, 2, 0] = 5
    model = IsoFullModel(fitting_method=method, var_fix_sigma=method != "joint_newton",
                         share_variance=method == "marginal_newton",
                         fitting_configs={"max_epochs": 6})
    model.setup_data(Y, corr_sp=K)
    before = model.forward().detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(quiet=True)
        after = model.forward().detach()
    assert torch.isfinite(after).all() and (after >= before - 1e-3).all()
    assert torch.isfinite(model.logger.best_loss).all()


def test_single_spot_fit():
    import numpy as np

    model = IsoFullModel(fitting_method="marginal_newton", dtype=D)
    model.setup_data(torch.tensor([[3.0, 1.0, 2.0]], dtype=D), corr_sp=np.ones((1, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(quiet=True)
    assert model.logger.converged.all() and torch.isfinite(model.forward()).all()


def test_marginal_gd_warns_only_on_a_dense_log_determinant():
    import numpy as np
    import scipy.sparse as sp

    # marginal_gd warns only where its log-determinant gradient is dense: a full-rank kernel
    # given without its sparse precision
    big = ref.car_kernel(18)
    Yb = ref.simulate_counts(big, 1, 3, seed=2)
    with pytest.warns(UserWarning, match="dense"):
        IsoFullModel(fitting_method="marginal_gd", dtype=D).setup_data(Yb, corr_sp=big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        IsoFullModel(fitting_method="marginal_gd", dtype=D).setup_data(
            Yb, corr_sp_precision=sp.csr_matrix(np.linalg.inv(big)))
