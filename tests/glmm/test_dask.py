"""Gene batches on a Dask cluster give the fits of one local process."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from distributed import Client, LocalCluster

from splisosm.data.simulation import simulate_isoform_data
from splisosm.hyptest_glmm import SplisosmGLMM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    # two single-threaded worker processes, as two machines of a cluster would be
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def _fit(backend: str, **kwargs) -> SplisosmGLMM:
    adata = simulate_isoform_data(n_genes=8, n_isoforms=[2, 3] * 4, grid_size=(8, 8), du_fraction=0.5, seed=1)
    model = SplisosmGLMM(**kwargs)
    model.setup_data(adata, group_gene_by_n_iso=True, design_mtx="covariate")
    model.fit(batch_size=2, from_null=True, print_progress=False, random_seed=7, backend=backend)
    return model


@pytest.mark.parametrize("method", ["joint_gd", "marginal_newton"])
def test_dask_fits_equal_one_local_process(client, method) -> None:
    settings = {"fitting_method": method, "fitting_configs": {"max_epochs": 30}}
    local, cluster = _fit("loky", **settings), _fit("dask", **settings)
    for key, states in local.fit_record.states.items():
        for a, b in zip(states, cluster.fit_record.states[key]):
            assert a.converged == b.converged and a.best_epoch == b.best_epoch
            for name, value in a.params.items():
                torch.testing.assert_close(b.params[name], value, rtol=0, atol=0)
    for model in (local, cluster):
        model.test_differential_usage(method="marginal-score", print_progress=False)
    pd.testing.assert_frame_equal(local.get_formatted_test_results("du"), cluster.get_formatted_test_results("du"))


def test_the_kernel_reaches_each_worker_once(client) -> None:
    sent = []
    original = client.scatter

    def scatter(data, *args, **kwargs):
        sent.append((type(data), kwargs.get("broadcast")))
        return original(data, *args, **kwargs)

    client.scatter = scatter
    try:
        _fit("dask", fitting_configs={"max_epochs": 5})
    finally:
        client.scatter = original
    assert sent == [(list, True)]  # one broadcast of [kernel, design] for the whole fit


def test_dask_without_a_client_says_how_to_make_one(monkeypatch) -> None:
    import distributed

    def no_client():
        raise ValueError("No clients found")

    monkeypatch.setattr(distributed, "get_client", no_client)
    adata = simulate_isoform_data(n_genes=2, n_isoforms=2, grid_size=(6, 6), seed=0)
    model = SplisosmGLMM(fitting_configs={"max_epochs": 5})
    model.setup_data(adata, group_gene_by_n_iso=True)
    with pytest.raises(ValueError, match="create one first"):
        model.fit(print_progress=False, backend="dask")
    with pytest.raises(ValueError, match="backend"):
        model.fit(print_progress=False, backend="ray")
