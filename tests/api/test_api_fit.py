"""SplisosmGLMM.fit orchestration and the per-gene accessors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers.glmm_data import make_adata
from splisosm.glmm._fit import resolve_n_jobs
from splisosm.glmm.glm import MultinomGLM
from splisosm.hyptest_glmm import IsoFullModel, IsoNullNoSpVar, SplisosmGLMM

EPOCHS = {"max_epochs": 20}


def _model(model_type: str = "glmm-full", grouped: bool = True, adata=None, **setup) -> SplisosmGLMM:
    model = SplisosmGLMM(model_type=model_type, fitting_configs=dict(EPOCHS))
    model.setup_data(make_adata() if adata is None else adata, group_gene_by_n_iso=grouped, **setup)
    return model


def _params(model: SplisosmGLMM, key: str | None = None) -> list[dict[str, torch.Tensor]]:
    return [s.params for s in model.fit_record.states[key or model.model_type]]


def _assert_same_params(a, b, atol: float = 0.0) -> None:
    for pa, pb in zip(a, b):
        for name in pa:
            torch.testing.assert_close(pa[name], pb[name], atol=atol, rtol=atol)


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("n_jobs", [0, 1.5, "2"])
def test_bad_n_jobs(n_jobs) -> None:
    with pytest.raises(ValueError, match="n_jobs"):
        _model("glm").fit(n_jobs=n_jobs, print_progress=False)


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        _model("glm").fit(batch_size=0, print_progress=False)


def test_n_jobs_resolution(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert resolve_n_jobs(3, "cpu") == 3
    assert resolve_n_jobs(-1, "cpu") == 4
    assert resolve_n_jobs(-3, "cpu") == 2
    with pytest.warns(UserWarning, match="more than the 4 cores available; using 4"):
        assert resolve_n_jobs(64, "cpu") == 4
    with pytest.warns(UserWarning, match="only supported on CPU"):
        assert resolve_n_jobs(2, "cuda") == 1
    for bad in (0, 2.0, "2", True):
        with pytest.raises(ValueError, match="`n_jobs`"):
            resolve_n_jobs(bad, "cpu")


def test_batch_size_ignored_without_grouping() -> None:
    model = _model("glm", grouped=False)
    with pytest.warns(UserWarning, match="Ignoring batch size argument"):
        model.fit(batch_size=4, print_progress=False)
    assert model.fit_record.info()["batch_size"] == 1


def test_from_null_rejected_for_glm() -> None:
    with pytest.raises(ValueError, match="glm"):
        _model("glm").fit(from_null=True, print_progress=False)


def test_from_null_rejected_for_joint_newton() -> None:
    model = SplisosmGLMM(fitting_method="joint_newton", var_fix_sigma=False)
    model.setup_data(make_adata())
    with pytest.raises(ValueError, match="joint_newton"):
        model.fit(from_null=True, print_progress=False)


# ------------------------------------------------------------------------------ fitting
@pytest.mark.parametrize(
    "model_type, cls",
    [("glmm-full", IsoFullModel), ("glmm-null", IsoNullNoSpVar), ("glm", MultinomGLM)],
)
def test_fitted_models_types_and_summary(model_type, cls) -> None:
    model = _model(model_type)
    assert model.get_fitted_models() == []
    with pytest.raises(RuntimeError):
        model.get_training_summary()
    with pytest.raises(RuntimeError):
        model.get_gene_model("G0")
    with pytest.raises(RuntimeError):
        model.get_fitted_ratios_anndata()
    model.fit(batch_size=2, print_progress=False)
    fitted = model.get_fitted_models()
    assert len(fitted) == 4 and all(type(m) is cls for m in fitted)
    assert [m.n_isos for m in fitted] == [2, 3, 2, 3]
    summary = model.get_training_summary()
    assert list(summary.columns) == ["model_type", "converged", "best_loss", "best_epoch", "fitting_time_s"]
    assert list(summary.index) == model.gene_names and summary.index.name == "gene"
    assert (summary["model_type"] == model_type).all()
    # Q1: real training logs survive batching.
    assert np.isfinite(summary["best_loss"]).all() and (summary["best_loss"] > 0).all()
    assert (summary["best_epoch"] >= 0).all() and (summary["fitting_time_s"] > 0).all()


def test_batched_grouped_and_single_fits_agree() -> None:
    """Q2: grouped fits map back to gene order, whatever the batch size."""
    single = _model(grouped=False)
    single.fit(print_progress=False)
    for batch_size in (1, 3):
        grouped = _model()
        grouped.fit(batch_size=batch_size, print_progress=False)
        _assert_same_params(_params(single), _params(grouped), atol=2e-3)
        np.testing.assert_allclose(
            single.get_training_summary()["best_loss"], grouped.get_training_summary()["best_loss"], rtol=1e-4
        )


def test_seeded_fits_identical() -> None:
    runs = []
    for _ in range(2):
        model = _model()
        model.fit(batch_size=2, random_seed=7, print_progress=False)
        runs.append(_params(model))
    _assert_same_params(*runs)


def test_parallel_matches_serial() -> None:
    serial = _model()
    serial.fit(batch_size=2, random_seed=1, print_progress=False)
    parallel = _model()
    parallel.fit(n_jobs=2, batch_size=2, random_seed=1, print_progress=False)
    _assert_same_params(_params(serial), _params(parallel), atol=1e-6)
    # Q1: the training log comes back from the workers.
    assert np.isfinite(parallel.get_training_summary()["best_loss"]).all()


def test_with_design_mtx_fits_fixed_effects() -> None:
    model = _model("glm", design_mtx=["cov", "flag"])
    model.fit(with_design_mtx=True, print_progress=False)
    assert all(p["beta"].shape == (1, 2, m - 1) for p, m in zip(_params(model), model.n_isos_per_gene))
    assert any(p["beta"].abs().sum() > 0 for p in _params(model))
    model.fit(print_progress=False)
    assert all(p["beta"].shape[1] == 0 for p in _params(model))


def test_from_null_stores_both_and_denovo_clears_null() -> None:
    model = _model()
    model.fit(from_null=True, batch_size=2, print_progress=False)
    assert set(model.fit_record.states) == {"glmm-null", "glmm-full"}
    assert all(torch.isinf(p["theta_logit"]).all() for p in _params(model, "glmm-null"))
    assert all(torch.isfinite(p["theta_logit"]).all() for p in _params(model, "glmm-full"))
    model.fit(print_progress=False)  # Q21: no stale null states
    assert set(model.fit_record.states) == {"glmm-full"}


def test_from_null_without_refit() -> None:
    model = _model("glmm-null")
    model.fit(from_null=True, refit_null=False, print_progress=False)
    assert model.fit_record.info() == {"with_design_mtx": False, "from_null": True, "refit_null": False,
                                       "batch_size": 1, "design_scale": None}
    assert all(type(m) is IsoNullNoSpVar for m in model.get_fitted_models())


def test_from_null_retries_fit_only_the_genes_that_need_them(monkeypatch) -> None:
    # The from-null protocol fits the full model again, from the better null fit, for the genes
    # whose full fit came out below their null fit. Only those genes run that fit, and every
    # gene's states are the ones it gets in a batch of its own.
    import splisosm.glmm.model

    adata = make_adata(n_isos=(2, 3) * 4, spatial_sd=0.5, seed=1)
    configs = {"max_epochs": 50}
    sizes = []
    fit_together = splisosm.glmm.model.fit_together

    def recording(models, **kwargs):
        sizes.append(sum(m.n_genes for m in models))
        return fit_together(models, **kwargs)

    monkeypatch.setattr(splisosm.glmm._runner, "fit_together", recording)
    together = SplisosmGLMM(model_type="glmm-full", fitting_configs=dict(configs))
    together.setup_data(adata, group_gene_by_n_iso=True)
    together.fit(from_null=True, batch_size=8, print_progress=False)
    # null, full, null from full, then the retries: some genes but not all (these data)
    assert len(sizes) == 4 and 0 < sizes[3] < sizes[0] == 8
    alone = SplisosmGLMM(model_type="glmm-full", fitting_configs=dict(configs))
    alone.setup_data(adata, group_gene_by_n_iso=False)  # one gene per batch
    alone.fit(from_null=True, print_progress=False)
    # (equal bits where the engine's packed products run; round-off apart on other CPUs)
    for key in ("glmm-null", "glmm-full"):
        _assert_same_params(_params(together, key), _params(alone, key), atol=1e-4)


def test_from_null_retry_states_land_on_their_genes(monkeypatch) -> None:
    # Force every stage's choice: the null fit from the full one better than the first null fit,
    # every first full fit below it (so every gene retries, from the second null fit), every
    # retry better (so every gene takes it). Each gene must end with the states it gets in a
    # batch of its own, where no gene can be mixed up with another (a retry's states given to
    # the wrong gene of a part fail this).
    from splisosm.glmm import _runner

    objective = _runner._objective
    calls = []

    def forced(model):
        f = objective(model)
        calls.append(type(model).__name__)
        if calls[-1] == "IsoNullNoSpVar":
            # per part: the first null fit, then the null fit from the full one
            second = calls.count("IsoNullNoSpVar") % 2 == 0
            return torch.full_like(f, 1e30 if second else -1e30)
        # per part the first full fit follows its two nulls; the retries come after all parts
        first = len(calls) >= 3 and calls[-3:-1] == ["IsoNullNoSpVar"] * 2
        return torch.full_like(f, -1e31 if first else 1e31)

    monkeypatch.setattr(_runner, "_objective", forced)
    adata = make_adata(n_isos=(2, 3) * 3, spatial_sd=0.5, seed=1)
    fits = []
    for grouped in (True, False):  # the genes of a part together, then one gene per batch
        calls.clear()
        model = SplisosmGLMM(model_type="glmm-full", fitting_configs={"max_epochs": 30})
        model.setup_data(adata, group_gene_by_n_iso=grouped)
        model.fit(from_null=True, print_progress=False)
        fits.append(model)
    for key in ("glmm-null", "glmm-full"):
        _assert_same_params(_params(fits[0], key), _params(fits[1], key), atol=1e-4)


def test_user_fitting_configs_not_mutated() -> None:
    configs = {"max_epochs": 5}
    model = SplisosmGLMM(fitting_configs=configs)
    model.setup_data(make_adata())
    model.fit(print_progress=False)
    assert configs == {"max_epochs": 5}
    assert model.model_configs["fitting_configs"] == {"max_epochs": 5}


def test_progress_goes_to_stderr(capsys) -> None:
    model = _model("glm")
    model.fit(print_progress=True)
    captured = capsys.readouterr()
    assert "Fitting 4 genes" in captured.err and "finished" in captured.err
    assert captured.out == ""


def test_quiet_false_reports_nonconvergence() -> None:
    model = SplisosmGLMM(fitting_configs={"max_epochs": 2})
    model.setup_data(make_adata())
    with pytest.warns(UserWarning):
        model.fit(quiet=False, print_progress=False)


# ------------------------------------------------------------------------------ accessors
def test_gene_model_lookup_and_duplicates() -> None:
    adata = make_adata()
    adata.var["gene_label"] = adata.var["gene_label"].replace({"Label2": "Label0"})
    model = _model(adata=adata, gene_names="gene_label")
    model.fit(batch_size=2, print_progress=False)
    assert model.gene_names == ["Label0", "Label1", "Label0", "Label3"]
    with pytest.raises(KeyError, match="Label0"):
        model.get_gene_model("nope")
    first = model.get_gene_model("Label0")
    torch.testing.assert_close(first.nu.detach(), _params(model)[0]["nu"])
    torch.testing.assert_close(model["Label3"].nu.detach(), _params(model)[3]["nu"])
    # Q15: duplicated display names keep their own parameters.
    assert not torch.equal(_params(model)[0]["nu"], _params(model)[2]["nu"])
    assert len(model.get_training_summary()) == 4


def test_fitted_models_are_fresh_copies() -> None:
    model = _model("glmm-null")
    model.fit(print_progress=False)
    m = model.get_fitted_models()[0]
    with torch.no_grad():
        m.nu.add_(5.0)
    assert not torch.equal(model.get_fitted_models()[0].nu, m.nu)


def test_fitted_ratios_with_custom_gene_names() -> None:
    """Q8: ratios placed by gene index even when display names differ from group keys."""
    model = _model(gene_names="gene_label")
    model.fit(batch_size=2, print_progress=False)
    out = model.get_fitted_ratios_anndata(layer_name="pi")
    ratios = out.layers["pi"]
    assert ratios.shape == model.filtered_adata.shape and ratios.dtype == np.float32
    assert np.isfinite(ratios).all()
    for g, idx in enumerate(model.setup_record.genes.var_index):
        np.testing.assert_allclose(ratios[:, idx].sum(1), 1.0, rtol=1e-5)
        pi = model.get_fitted_models()[g].get_isoform_ratio()[0].numpy()
        np.testing.assert_allclose(ratios[:, idx], pi, rtol=1e-6)
    assert "pi" not in model.filtered_adata.layers
