"""Spatial kernels: mutual k-NN graph, standardised CAR kernel (dense and implicit), identity."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from splisosm.ops import use_reference
from splisosm.spatial import car, graph
from splisosm.spatial.car import car_precision, car_precision_factor
from splisosm.spatial.graph import connected_components, mutual_knn_adjacency
from splisosm.spatial.kernel import DENSE_THRESHOLD, IdentityKernel, SpatialCovKernel, null_eigenpairs


def grid(nx: int, ny: int) -> np.ndarray:
    gx, gy = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float), indexing="ij")
    return np.column_stack([gx.ravel(), gy.ravel()])


def random_coords(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, np.sqrt(n), size=(n, 2))


def brute_force_mutual_knn(coords: np.ndarray, k: int) -> np.ndarray:
    """Dense reference: rank all points by (squared distance, index), keep mutual pairs."""
    n = coords.shape[0]
    d2 = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
    idx = np.broadcast_to(np.arange(n), (n, n))
    order = np.lexsort((idx, d2), axis=-1)[:, : k + 1]
    directed = np.zeros((n, n))
    np.put_along_axis(directed, order, 1.0, axis=1)
    adj = directed * directed.T
    np.fill_diagonal(adj, 0.0)
    isolated = adj.sum(1) == 0
    adj[isolated, isolated] = 1.0
    return adj


# ---- graph --------------------------------------------------------------------------------


def test_knn_rook_grid_interior_nodes_have_their_four_lattice_neighbours():
    nx, ny = 12, 9
    coords = grid(nx, ny)
    adj = mutual_knn_adjacency(coords, 4)
    manhattan = np.abs(coords[:, None] - coords[None]).sum(-1)
    lattice = (manhattan == 1).astype(float)
    x, y = coords.T
    interior = (x > 0) & (x < nx - 1) & (y > 0) & (y < ny - 1)
    dense = adj.toarray()
    np.testing.assert_array_equal(dense[interior], lattice[interior])
    assert np.all(dense.sum(1)[interior] == 4)


@pytest.mark.parametrize("k", [1, 3, 4, 8, 12, 20])
def test_knn_matches_brute_force_with_index_tie_breaking(k):
    # integer lattice: many exact distance ties, including tie groups beyond the queried set
    coords = grid(11, 10)
    adj = mutual_knn_adjacency(coords, k)
    assert isinstance(adj, sp.csr_matrix) and adj.dtype == np.float64 and adj.has_sorted_indices
    np.testing.assert_array_equal(adj.toarray(), brute_force_mutual_knn(coords, k))


@pytest.mark.parametrize("kk", [3, 6])
def test_neighbour_ranking_resolves_tie_groups_larger_than_the_query(kk):
    # 12 lattice points at distance 5 from the origin: the tie group outgrows the k + 8 query
    ring = [(5, 0), (-5, 0), (0, 5), (0, -5)]
    ring += [(a * x, b * y) for x, y in [(3, 4), (4, 3)] for a in (1, -1) for b in (1, -1)]
    coords = np.array([(0, 0)] + ring + [(20 + i, 20) for i in range(10)], dtype=float)
    nbrs = graph._sorted_neighbours(cKDTree(coords), coords, kk)
    d2 = ((coords[:, None] - coords[None]) ** 2).sum(-1)
    expected = np.lexsort((np.broadcast_to(np.arange(len(coords)), d2.shape), d2), axis=-1)[:, :kk]
    np.testing.assert_array_equal(nbrs, expected)
    np.testing.assert_array_equal(nbrs[0], np.arange(kk))


def test_knn_random_points_symmetric_binary():
    coords = random_coords(300, seed=3)
    adj = mutual_knn_adjacency(coords, 6)
    dense = adj.toarray()
    np.testing.assert_array_equal(dense, dense.T)
    assert set(np.unique(dense)) <= {0.0, 1.0}
    np.testing.assert_array_equal(dense, brute_force_mutual_knn(coords, 6))


def test_knn_isolated_spot_gets_self_loop_only():
    coords = np.vstack([grid(4, 4), [[100.0, 100.0]]])
    dense = mutual_knn_adjacency(coords, 4).toarray()
    assert dense[16, 16] == 1.0 and dense[16, :16].sum() == 0 and dense[:16, 16].sum() == 0
    assert np.all(np.diag(dense)[:16] == 0)


def test_knn_argument_errors():
    with pytest.raises(ValueError):
        mutual_knn_adjacency(np.zeros(5), 2)
    with pytest.raises(ValueError):
        mutual_knn_adjacency(grid(3, 3), 0)
    with pytest.raises(ValueError):
        mutual_knn_adjacency(np.array([[0.0, np.nan], [1.0, 1.0]]), 1)


def test_connected_components_of_two_clusters():
    coords = np.vstack([grid(3, 3), grid(2, 2) + 50.0])
    n_comp, labels = connected_components(mutual_knn_adjacency(coords, 4))
    assert n_comp == 2
    assert len(set(labels[:9])) == 1 and len(set(labels[9:])) == 1 and labels[0] != labels[9]


# ---- CAR kernel, dense mode ---------------------------------------------------------------


def test_car_precision_formula_with_weights_and_isolated_node():
    adj = sp.csr_matrix(np.array([[0, 2.0, 0, 0], [2.0, 0, 0.5, 0], [0, 0.5, 0, 0], [0, 0, 0, 0]]))
    rho = 0.7
    deg = np.maximum(adj.toarray().sum(1), 1e-12)
    expected = np.eye(4) - rho * adj.toarray() / np.sqrt(np.outer(deg, deg))
    np.testing.assert_allclose(car_precision(adj, rho).toarray(), expected, atol=1e-15)
    factor = car_precision_factor(adj, rho)
    np.testing.assert_allclose((factor @ factor.T).toarray(), expected, atol=1e-14)


def test_dense_kernel_unit_diagonal_and_sparse_precision_inverse():
    kern = SpatialCovKernel(random_coords(150), k_neighbors=5, rho=0.95)
    assert kern.is_dense and kern.n_spots == 150 and kern.rho == 0.95
    K = kern.K_sp.numpy()
    np.testing.assert_allclose(np.diag(K), 1.0, atol=1e-12)
    np.testing.assert_allclose(K, K.T, atol=0)
    prec = kern.sparse_precision()
    assert isinstance(prec, sp.csr_matrix) and prec.dtype == np.float64 and prec.has_sorted_indices
    np.testing.assert_allclose(K @ prec.toarray(), np.eye(150), atol=1e-9)
    # pattern of the graph plus the diagonal
    pattern = (kern.adjacency + sp.identity(150)).toarray() != 0
    np.testing.assert_array_equal(prec.toarray() != 0, pattern)


def test_unstandardised_kernel_is_car_inverse():
    coords = random_coords(80, seed=1)
    kern = SpatialCovKernel.from_coordinates(coords, k_neighbors=4, rho=0.9, standardize_cov=False)
    M = car_precision(mutual_knn_adjacency(coords, 4), 0.9).toarray()
    np.testing.assert_allclose(kern.K_sp.numpy(), np.linalg.inv(M), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kern.sparse_precision().toarray(), M, atol=1e-15)


def test_eigenpairs_reconstruct_and_are_cached():
    kern = SpatialCovKernel(grid(10, 8))
    evals, evecs = kern.eigenpairs()
    assert evals.dtype == torch.float64 and evecs.shape == (80, 80)
    assert torch.all(evals[:-1] >= evals[1:])
    K = kern.K_sp
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, K, atol=1e-10, rtol=0)
    eye = torch.eye(80, dtype=torch.float64)
    torch.testing.assert_close(evecs.T @ evecs, eye, atol=1e-12, rtol=0)
    ev5, vec5 = kern.eigenpairs(5)
    assert ev5.shape == (5,) and vec5.shape == (80, 5)
    torch.testing.assert_close(ev5, evals[:5])
    torch.testing.assert_close(vec5, evecs[:, :5])
    assert kern.eigenpairs(500)[0].shape == (80,)  # clipped to n
    with pytest.raises(ValueError):
        kern.eigenpairs(0)


# ---- implicit mode ------------------------------------------------------------------------


def test_implicit_mode_agrees_with_dense_mode():
    coords = random_coords(400, seed=2)
    dense = SpatialCovKernel(coords, k_neighbors=5)
    implicit = SpatialCovKernel(coords, k_neighbors=5, dense_threshold=100)
    assert dense.is_dense and not implicit.is_dense and implicit.K_sp is None
    np.testing.assert_allclose(
        implicit.sparse_precision().toarray(), dense.sparse_precision().toarray(), atol=1e-12
    )
    ev_d, vec_d = dense.eigenpairs(15)
    ev_i, vec_i = implicit.eigenpairs(15)
    torch.testing.assert_close(ev_i, ev_d, rtol=1e-8, atol=0)
    # eigenvectors of the dense K, whichever basis is chosen within (near-)degenerate pairs
    residual = dense.K_sp @ vec_i - vec_i * ev_i
    assert residual.abs().max() < 1e-8
    x = torch.randn(400, 3, dtype=torch.float64)
    torch.testing.assert_close(implicit.Kx(x), dense.Kx(x), atol=1e-10, rtol=1e-10)
    assert implicit.trace() == pytest.approx(dense.trace(), rel=1e-12)
    assert implicit.square_trace() == pytest.approx(dense.square_trace(), rel=1e-10)


def test_implicit_inverse_diagonal_matches_dense():
    kern = SpatialCovKernel(random_coords(200, seed=4), dense_threshold=10, standardize_cov=False)
    M = kern.sparse_precision()
    expected = np.diag(np.linalg.inv(M.toarray()))
    np.testing.assert_allclose(car.sparse_inverse_diagonal(M), expected, rtol=1e-8)
    with use_reference():  # the dense fallback of devices without native kernels
        np.testing.assert_allclose(car.sparse_inverse_diagonal(M), expected, rtol=1e-10)


def test_implicit_mode_moderate_size():
    n = DENSE_THRESHOLD + 100
    kern = SpatialCovKernel(random_coords(n, seed=5))
    assert not kern.is_dense
    evals, evecs = kern.eigenpairs(20)
    assert evals.shape == (20,) and evecs.shape == (n, 20) and torch.all(evals[:-1] >= evals[1:])
    residual = kern.Kx(evecs) - evecs * evals
    assert residual.abs().max() < 1e-7
    probe = np.zeros((n, 3))
    probe[[0, 1234, n - 1], [0, 1, 2]] = 1.0
    np.testing.assert_allclose(kern.Kx(probe).numpy()[[0, 1234, n - 1], [0, 1, 2]], 1.0, rtol=1e-9)
    with pytest.raises(ValueError, match="sparse_precision"):
        kern.eigenpairs(None)
    with pytest.raises(ValueError):
        kern.eigenvalues()


# ---- validation and warnings --------------------------------------------------------------


def test_constructor_requires_exactly_one_input():
    with pytest.raises(ValueError):
        SpatialCovKernel()
    with pytest.raises(ValueError):
        SpatialCovKernel(grid(3, 3), mutual_knn_adjacency(grid(3, 3), 2))


@pytest.mark.parametrize("rho", [1.0, -0.1, float("nan"), float("inf"), "0.5", True])
def test_invalid_rho(rho):
    with pytest.raises(ValueError):
        SpatialCovKernel(grid(4, 4), rho=rho)


def test_non_symmetric_adjacency_warns_and_is_averaged():
    adj = mutual_knn_adjacency(grid(8, 8), 4).toarray()
    adj[0, 1] = 3.0
    with pytest.warns(RuntimeWarning, match="not symmetric"):
        kern = SpatialCovKernel.from_adjacency(adj)
    assert kern.adjacency[0, 1] == kern.adjacency[1, 0] == 2.0


def test_dense_adjacency_warns():
    adj = np.ones((6, 6)) - np.eye(6)
    with pytest.warns(RuntimeWarning, match="dense"):
        SpatialCovKernel(adj_matrix=sp.csr_matrix(adj))


def test_supplied_adjacency_weights_are_kept():
    adj = sp.random(60, 60, density=0.05, random_state=0)
    adj = (adj + adj.T).tocsr()
    kern = SpatialCovKernel(adj_matrix=adj, rho=0.8)
    np.testing.assert_allclose(kern.adjacency.toarray(), adj.toarray())
    K = kern.K_sp.numpy()
    np.testing.assert_allclose(K @ kern.sparse_precision().toarray(), np.eye(60), atol=1e-9)


# ---- other API ----------------------------------------------------------------------------


def test_sampling_has_kernel_covariance():
    kern = SpatialCovKernel(random_coords(25, seed=6), rho=0.9)
    draws = kern.sample(40000, rng=1)
    np.testing.assert_array_equal(draws, kern.sample(40000, rng=1))
    cov = draws @ draws.T / draws.shape[1]
    np.testing.assert_allclose(cov, kern.K_sp.numpy(), atol=0.05)


def test_factor_quadratic_forms_and_traces():
    kern = SpatialCovKernel(grid(7, 6), rho=0.9)
    K = kern.K_sp
    assert kern.Q is None
    kern.eigendecomposition()
    torch.testing.assert_close(kern.Q @ kern.Q.T, K, atol=1e-10, rtol=0)
    assert kern.K_eigvals.shape == (42,) and kern.K_eigvecs.shape == (42, 42)
    x = torch.randn(42, dtype=torch.float64)
    exact = x @ K @ x
    torch.testing.assert_close(kern.xtKx(x), exact)
    torch.testing.assert_close(kern.xtKx_exact(x), exact)
    torch.testing.assert_close(kern.xtKx_approx(x, 42), exact)
    ev, vec = kern.eigenpairs(3)
    torch.testing.assert_close(kern.xtKx_approx(x, 3), ((vec.T @ x) ** 2 * ev).sum())
    X = torch.randn(42, 2, dtype=torch.float64)
    torch.testing.assert_close(kern.xtKx(X), X.T @ K @ X)
    assert kern.trace() == pytest.approx(42.0)
    assert kern.square_trace() == pytest.approx(float((K * K).sum()))
    torch.testing.assert_close(kern.eigenvalues(4), torch.linalg.eigvalsh(K).flip(0)[:4])
    assert kern.realization() is K
    with pytest.raises(ValueError):
        kern.Kx(torch.ones(5))


def test_implicit_realization_warns_or_uses_factor():
    kern = SpatialCovKernel(random_coords(60, seed=7), dense_threshold=10)
    dense = SpatialCovKernel(random_coords(60, seed=7))
    with pytest.warns(RuntimeWarning):
        full = kern.realization()
    torch.testing.assert_close(full, dense.K_sp, atol=1e-10, rtol=0)
    kern.eigendecomposition(10)
    ev, vec = dense.eigenpairs(10)
    torch.testing.assert_close(kern.realization(), vec @ torch.diag(ev) @ vec.T, atol=1e-8, rtol=0)


def test_centering_double_centres_and_has_no_precision():
    coords = random_coords(90, seed=8)
    plain = SpatialCovKernel(coords)
    centred = SpatialCovKernel(coords, centering=True)
    H = torch.eye(90, dtype=torch.float64) - 1.0 / 90
    torch.testing.assert_close(centred.K_sp, H @ plain.K_sp @ H, atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        centred.sparse_precision()
    implicit = SpatialCovKernel(coords, centering=True, dense_threshold=10)
    assert implicit.trace() == pytest.approx(centred.trace(), rel=1e-10)
    ev_implicit, ev_dense = implicit.eigenpairs(5)[0], centred.eigenpairs(5)[0]
    torch.testing.assert_close(ev_implicit, ev_dense, rtol=1e-8, atol=0)


# ---- identity -----------------------------------------------------------------------------


def test_identity_kernel():
    kern = IdentityKernel(7)
    evals, evecs = kern.eigenpairs(3)
    torch.testing.assert_close(evals, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(evecs, torch.eye(7, 3, dtype=torch.float64))
    assert kern.eigenpairs()[0].shape == (7,)
    np.testing.assert_array_equal(kern.sparse_precision().toarray(), np.eye(7))
    torch.testing.assert_close(kern.K_sp, torch.eye(7, dtype=torch.float64))
    assert kern.trace() == 7.0 and kern.square_trace() == 7.0
    x = torch.randn(7, 2, dtype=torch.float64)
    torch.testing.assert_close(kern.Kx(x), x)


def test_centred_identity_kernel():
    kern = IdentityKernel(6, centering=True)
    evals, evecs = kern.eigenpairs()
    H = torch.eye(6, dtype=torch.float64) - 1.0 / 6
    torch.testing.assert_close(evals, torch.tensor([1.0] * 5 + [0.0], dtype=torch.float64))
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, H, atol=1e-12, rtol=0)
    assert kern.trace() == 5.0
    with pytest.raises(ValueError):
        kern.sparse_precision()


def test_null_eigenpairs():
    evals, evecs = null_eigenpairs(16)
    torch.testing.assert_close(evals, torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(evecs, torch.full((16, 1), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError):
        null_eigenpairs(0)
