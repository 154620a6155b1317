"""The native joint_gd engine against the Python fitter (autograd + torch.optim), its reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from helpers import reference_models as ref
from splisosm.glmm.isomodels import IsoFullModel, IsoNullNoSpVar
from splisosm.ops import use_reference
from splisosm.ops.engine import engine_available, joint_gd_fit

D = torch.float64
NAMES = ("nu", "beta", "bias_eta", "sigma", "theta_logit")
LOW_RANK = 7

pytestmark = pytest.mark.skipif(not engine_available(torch.device("cpu")),
                                reason="the compiled extension is not built")


@pytest.fixture(scope="module")
def data():
    K = ref.car_kernel(5)
    Y = ref.simulate_counts(K, 3, 3, seed=11)
    X = torch.randn(25, 2, dtype=D, generator=torch.Generator().manual_seed(5))
    return K, Y, X


def _fit(data, *, reference: bool, cls=IsoFullModel, genes=slice(None), low_rank=False,
         dtype=D, **kw):
    K, Y, X = data
    configs = {"max_epochs": 500, **kw.pop("fitting_configs", {})}
    model = cls(fitting_method="joint_gd", dtype=dtype, fitting_configs=configs, **kw)
    if low_rank:
        lam, V = np.linalg.eigh(K)
        model.setup_data(Y[genes], corr_sp_eigvals=lam[::-1][:LOW_RANK].copy(),
                         corr_sp_eigvecs=V[:, ::-1][:, :LOW_RANK].copy(), design_mtx=X)
    else:
        model.setup_data(Y[genes], corr_sp=K, design_mtx=X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if reference:
            with use_reference():
                model.fit(quiet=True)
        else:
            model.fit(quiet=True)
    return model


def _assert_same_fit(a, b, rtol: float, atol: float) -> None:
    for k in NAMES:
        torch.testing.assert_close(getattr(a, k).detach(), getattr(b, k).detach(), rtol=rtol,
                                   atol=atol, equal_nan=True)
    # Once a gene stops, the Python fitter keeps stepping it (which never changes its result)
    # while the engine freezes it, so the logs agree up to each gene's stopping epoch.
    ha, hb = a.logger.loss_history, b.logger.loss_history
    # (the engine's row of a stopped gene repeats its last logged loss exactly)
    epochs = torch.arange(ha.shape[0])[:, None]
    moved = torch.cat([torch.ones_like(ha[:1], dtype=torch.bool), ha[1:] != ha[:-1]])
    stop = torch.where(moved, epochs, 0).amax(0)
    logged = epochs <= stop[None, :]
    torch.testing.assert_close(ha[logged], hb[: ha.shape[0]][logged], rtol=rtol, atol=atol)
    assert torch.equal(a.logger.best_epoch, b.logger.best_epoch)
    assert torch.equal(a.logger.converged, b.logger.converged)


def test_default_trajectory_matches_python_after_500_epochs(data):
    native = _fit(data, reference=False)
    python = _fit(data, reference=True)
    assert native.logger.loss_history.shape == (500, 3)
    _assert_same_fit(native, python, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [
    {"var_fix_sigma": False, "var_prior_model": "gamma"},
    {"share_variance": False, "var_fix_sigma": False, "var_prior_model": "inv_gamma"},
    {"low_rank": True, "var_fix_sigma": False},
    {"cls": IsoNullNoSpVar},
    {"fitting_configs": {"optim": "sgd", "lr": 1e-3}},
    {"fitting_configs": {"tol": 1e-4, "tol_relative": True, "patience": 3}},
    {"fitting_configs": {"tol": 0.05, "patience": 2}},
], ids=["gamma", "per-isoform-inv-gamma", "low-rank", "null", "sgd", "relative-tol", "early-stop"])
def test_variants_match_python(data, case):
    # Adam divides by the root of its second moment, so where a gradient component hovers near
    # zero, round-off differences (summation order, which differs between CPUs' BLAS kernels)
    # grow over the epochs: on one AMD machine a random effect of the low-rank case differed by
    # 3e-7 after 100 epochs. 1e-6 is the engine's parity target, and still far below the
    # differences any real change of the fit makes.
    case = dict(case)
    case["fitting_configs"] = {"max_epochs": 100, **case.get("fitting_configs", {})}
    _assert_same_fit(_fit(data, reference=False, **case), _fit(data, reference=True, **case),
                     rtol=1e-6, atol=1e-6)


def test_early_stopping_is_per_gene(data):
    model = _fit(data, reference=False, fitting_configs={"tol": 0.05, "patience": 2})
    epochs = model.logger.best_epoch
    assert model.logger.converged.all()
    assert len(set(epochs.tolist())) > 1, "genes should stop at different epochs"
    assert model.logger.loss_history.shape[0] < 500


def test_a_gene_does_not_depend_on_its_batch(data):
    # six genes give 12 rows (one GEMM for the batch), one gene 2 rows (matrix-vector products)
    K, _, X = data
    six = (K, ref.simulate_counts(K, 6, 3, seed=12), X)
    batch = _fit(six, reference=False)
    for g in range(6):
        single = _fit(six, reference=False, genes=slice(g, g + 1))
        for k in NAMES:
            torch.testing.assert_close(getattr(single, k)[0], getattr(batch, k)[g], rtol=1e-9,
                                       atol=1e-9)


def test_float32_reaches_the_float64_objective(data):
    K, Y, X = data
    single = _fit((K, Y.float(), X.float()), reference=False, dtype=torch.float32)
    double = _fit(data, reference=False)
    torch.testing.assert_close(single.logger.best_loss, double.logger.best_loss, rtol=1e-4, atol=0)


@pytest.mark.parametrize("epochs", [0, -5])
def test_zero_epochs_are_refused(data, epochs):
    # A fit of no epoch leaves the start values, on which every test would report p-values.
    with pytest.raises(ValueError, match=r"fitting_configs\['max_epochs'\]` must be an int >= 1"):
        _fit(data, reference=False, fitting_configs={"max_epochs": epochs})


def _op_args(data, dtype=D):
    K, Y, X = data
    lam, V = np.linalg.eigh(K)
    G, n, m = Y.shape
    q = m - 1
    return [Y.to(dtype), X.to(dtype), torch.from_numpy(lam).to(dtype),
            torch.from_numpy(V).to(dtype), torch.zeros(G, n, q, dtype=dtype),
            torch.zeros(G, 2, q, dtype=dtype), torch.zeros(G, q, dtype=dtype),
            torch.full((G, 1), 0.5, dtype=dtype), torch.full((G, 1), -3.0, dtype=dtype)]


def _start(Y: torch.Tensor, P: int, nu_seed: int | None = None) -> dict[str, torch.Tensor]:
    """Engine start values for counts Y (G, n, m): nu zero, or N(0, 0.1^2) from nu_seed."""
    G, n, q = Y.shape[0], Y.shape[1], Y.shape[2] - 1
    nu = (torch.zeros(G, n, q, dtype=Y.dtype) if nu_seed is None else
          0.1 * torch.randn(G, n, q, dtype=Y.dtype,
                            generator=torch.Generator().manual_seed(nu_seed)))
    return {"nu": nu, "beta": torch.zeros(G, P, q, dtype=Y.dtype),
            "bias_eta": torch.zeros(G, q, dtype=Y.dtype),
            "sigma": torch.full((G, 1), 0.6, dtype=Y.dtype),
            "theta_logit": torch.full((G, 1), -3.0, dtype=Y.dtype)}


COMMON = {"train_sigma": True, "train_theta": True, "prior": "none", "prior_params": {},
          "min_variance": 0.01, "max_theta": 1 - 1e-6,
          "configs": {"optim": "adam", "lr": 0.01, "tol": 1e-5, "patience": 5, "max_epochs": 3}}


def test_bad_inputs_name_the_argument(data):
    args = _op_args(data)
    params = dict(zip(NAMES, args[4:]))
    Y, X, lam, V = args[:4]
    with pytest.raises(RuntimeError, match="`nu`"):
        joint_gd_fit([Y], X, lam, V, [{**params, "nu": params["nu"][:, :-1]}], **COMMON)
    with pytest.raises(RuntimeError, match="`evals`"):
        joint_gd_fit([Y], X, lam[:-1], V, [params], **COMMON)
    with pytest.raises(RuntimeError, match="optim"):
        joint_gd_fit([Y], X, lam, V, [params],
                     **{**COMMON, "configs": {**COMMON["configs"], "optim": "lbfgs"}})
    with pytest.raises(RuntimeError, match="prior"):
        joint_gd_fit([Y], X, lam, V, [params], **{**COMMON, "prior": "lognormal"})
    with pytest.raises(RuntimeError, match="at least one group"):
        joint_gd_fit([], X, lam, V, [], **COMMON)
    for value, match in ((float("nan"), "NaN or infinite"), (-1.0, "negative values")):
        bad = Y.clone()
        bad[0, 3, 1] = value
        with pytest.raises(RuntimeError, match=match):
            joint_gd_fit([bad], X, lam, V, [params], **COMMON)
    start = [[t] for t in args[4:]]
    start[2] = start[2] * 2  # two bias tensors for one group of counts
    with pytest.raises(RuntimeError, match="`bias` must hold one tensor per group"):
        torch.ops.splisosm.joint_gd_fit([Y], X, lam, V, *start, True, True, "none", 0.0, 0.0,
                                        0.01, 1 - 1e-6, "adam", 0.01, 1e-5, False, 5, 3)


def test_opcheck(data):
    args = _op_args(data)
    # two groups of genes: the data's (m = 3) and two genes with their last isoforms merged
    Y2 = torch.cat([args[0][:2, :, :1], args[0][:2, :, 1:].sum(-1, keepdim=True)], -1)
    second = [Y2] + [t[:2, ..., :1] if t.dim() == 3 else t[:2] for t in args[4:]]
    second[3], second[4] = args[7][:2], args[8][:2]  # sigma, theta_logit: (G, 1) already
    groups = [[a, b] for a, b in zip([args[0]] + args[4:], second)]
    settings = [True, True, "gamma", 2.0, 0.3, 0.01, 1 - 1e-6, "adam", 0.01, 1e-5, False, 5, 4]
    torch.library.opcheck(torch.ops.splisosm.joint_gd_fit.default,
                          [groups[0], *args[1:4], *groups[1:], *settings],
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.parametrize("configs", [{}, {"tol": 0.05, "patience": 2}],
                         ids=["default", "early-stop"])
def test_groups_fitted_together_equal_separate_fits(configs):
    # Genes of two isoform counts share one call (one product with V for both); each group's
    # fit, including when its genes stop, is that of a call of its own.
    K = ref.car_kernel(5)
    lam, V = np.linalg.eigh(K)
    lam, V = torch.from_numpy(lam), torch.from_numpy(V)
    X = torch.randn(25, 2, dtype=D, generator=torch.Generator().manual_seed(5))
    counts = [ref.simulate_counts(K, 3, 3, seed=21), ref.simulate_counts(K, 2, 4, seed=22)]
    params = [_start(Y, 2) for Y in counts]
    settings = {**COMMON, "configs": {**COMMON["configs"], "max_epochs": 300, **configs}}
    together, _ = joint_gd_fit(counts, X, lam, V, params, **settings)
    for Y, start, joint in zip(counts, params, together):
        (alone,), _ = joint_gd_fit([Y], X, lam, V, [start], **settings)
        assert joint.loss_history.shape == alone.loss_history.shape
        torch.testing.assert_close(joint.loss_history, alone.loss_history, rtol=1e-9, atol=1e-9)
        # The products differ in round-off (one GEMM over both groups vs matrix-vector products
        # for one group's few rows), which Adam amplifies in components near a zero gradient.
        for name in NAMES:
            torch.testing.assert_close(joint.params[name], alone.params[name], rtol=1e-7,
                                       atol=1e-7)
        assert torch.equal(joint.best_epoch, alone.best_epoch)
        assert torch.equal(joint.converged, alone.converged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_the_thread_count(dtype):
    # The engine deals the genes of all groups to the threads by their work; with one thread
    # one bin holds them all. Equal bits either way, genes of unequal isoform counts included.
    K = ref.car_kernel(6)
    lam, V = (torch.from_numpy(a).to(dtype) for a in np.linalg.eigh(K))
    X = torch.randn(36, 2, dtype=dtype, generator=torch.Generator().manual_seed(6))
    counts = [ref.simulate_counts(K, g, m, seed=30 + m).to(dtype)
              for g, m in ((3, 2), (2, 3), (1, 4))]
    params = [_start(Y, 2, nu_seed=7) for Y in counts]
    settings = {**COMMON, "configs": {**COMMON["configs"], "max_epochs": 200}}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = joint_gd_fit(counts, X, lam, V, params, **settings)
        torch.set_num_threads(max(2, threads))
        many, _ = joint_gd_fit(counts, X, lam, V, params, **settings)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        for name in NAMES:
            assert torch.equal(a.params[name], b.params[name]), name
        assert torch.equal(a.loss_history, b.loss_history)


def test_engine_group_size_only_for_engine_fits():
    from splisosm.config import resolve_fitting_configs
    from splisosm.glmm._runner import ENGINE_GROUP_BYTES, FitPlan, engine_group_size
    from splisosm.spatial._build import KernelPayload

    eig = KernelPayload(eigvals=np.ones(3), eigvecs=np.zeros((100, 3)))
    gd = FitPlan("glmm-full", {"fitting_method": "joint_gd"})
    epochs = resolve_fitting_configs("joint_gd", None)["max_epochs"]
    per_gene = 4 * 100 * (2 * 11 + 3) + 8 * epochs  # working arrays + the loss history
    assert engine_group_size(gd, eig, 100, 3) == ENGINE_GROUP_BYTES // per_gene
    assert engine_group_size(FitPlan("glmm-null", {"fitting_method": "joint_gd"}), None, 100, 3) > 1
    for plan, kernel in [
        (FitPlan("glmm-full", {"fitting_method": "marginal_newton"}), eig),
        (FitPlan("glmm-full", {"fitting_method": "joint_gd",
                               "fitting_configs": {"optim": "lbfgs"}}), eig),
        (FitPlan("glm", {}), None),
        (gd, KernelPayload(precision=None)),  # precision-only route: Python fitter
    ]:
        assert engine_group_size(plan, kernel, 100, 3) == 1


def test_pipeline_results_do_not_depend_on_batch_size():
    from helpers.glmm_data import make_adata
    from splisosm import SplisosmGLMM

    adata = make_adata(side=6, n_isos=(2, 3, 2, 3, 2))
    stats = []
    for n_jobs in (1, 2):  # one process: engine groups; two: the given batches of one gene
        model = SplisosmGLMM(fitting_configs={"max_epochs": 40})
        model.setup_data(adata, layer="counts", group_iso_by="gene_symbol",
                         group_gene_by_n_iso=True, design_mtx="cov")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(batch_size=1, n_jobs=n_jobs, print_progress=False)
        model.test_differential_usage(print_progress=False)
        stats.append(model.get_formatted_test_results("du")["statistic"].to_numpy(dtype=float))
    np.testing.assert_allclose(stats[0], stats[1], rtol=1e-4)


@pytest.mark.parametrize("case", ["zero-count spots", "one spot", "six isoforms",
                                  "large and fractional counts"])
def test_edge_cases_match_python(case):
    if case == "one spot":
        K = np.ones((1, 1))
        Y = torch.tensor([[[3.0, 1.0]], [[0.0, 5.0]]], dtype=D)
    else:
        K = ref.car_kernel(3)
        Y = ref.simulate_counts(K, 2, 6 if case == "six isoforms" else 3, seed=4)
        if case == "zero-count spots":
            Y[0, :4] = 0
            Y[1] = 0
            Y[1, 2, 0] = 7  # a gene seen in a single spot
        if case == "large and fractional counts":
            # beyond the engine's log-factorial table, and between integers (lgamma)
            Y[0] = Y[0] * 1000
            Y[1, :3] = Y[1, :3] + 0.5
    X = torch.randn(K.shape[0], 1, dtype=D, generator=torch.Generator().manual_seed(2))
    data = (K, Y, X)
    kw = {"fitting_configs": {"max_epochs": 60}, "var_fix_sigma": False}
    # Counts of thousands make gradients of thousands: the two implementations' float64
    # round-off, amplified by Adam, reaches ~1e-7 in nu. The log-likelihood's constant (lgamma
    # beyond the log-factorial table) shows in every logged loss.
    tol = 1e-5 if case == "large and fractional counts" else 1e-7
    engine, python = _fit(data, reference=False, **kw), _fit(data, reference=True, **kw)
    _assert_same_fit(engine, python, rtol=tol, atol=tol)
    # the first logged loss, one step from equal starts: round-off apart only
    torch.testing.assert_close(engine.logger.loss_history[0], python.logger.loss_history[0],
                               rtol=1e-8, atol=0)
