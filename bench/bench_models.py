"""Per-gene GLMM fitting speed and accuracy (SPEC §6 / NUMERICS.md targets).

Usage: ``python bench/bench_models.py [--threads 2] [--genes 200] [--ref-genes 3]
[--marginal-genes 20] [--gd-epochs 20] [--skip-joint] [--skip-sparse] [--sparse-n 10000]``

1. ``joint_gd`` (500 epochs, defaults) on a 30 x 30 rook grid (n = 900), m = 3, all genes in one
   batch, against a readable per-gene pure-torch restatement (eigenbasis likelihood, autograd,
   Adam) timed on ``--ref-genes`` genes; also checks the two trajectories agree.
2. ``marginal_newton`` on the same grid with data simulated at known ``theta``: ms per gene and
   the recovered ``theta`` (sigma fixed at its initial value, and learned).
3. ``marginal_gd`` on the same grid for ``--gd-epochs`` epochs: the Laplace marginal and its
   gradient through the sparse factor and its selected inverse, against a per-gene restatement
   that differentiates a dense ``nq x nq`` Cholesky by autograd; checks the trajectories agree.
4. Exact sparse-precision ``marginal_newton`` at ``n = --sparse-n`` (no eigenpairs, no dense
   ``n x n`` matrix): seconds per gene and peak resident memory.
"""

from __future__ import annotations

import argparse
import math
import resource
import time
import warnings

import numpy as np
import torch
from _timing import machine_line

from splisosm.glmm.isomodels import IsoFullModel
from splisosm.spatial.kernel import SpatialCovKernel


def grid_kernel(side: int) -> SpatialCovKernel:
    xs, ys = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return SpatialCovKernel.from_coordinates(np.c_[xs.ravel(), ys.ravel()], k_neighbors=4,
                                             rho=0.99)


def simulate(kernel: SpatialCovKernel, n_genes: int, m: int, sigma2: float, theta: float,
             depth: float, seed: int) -> torch.Tensor:
    """Counts ``(G, n, m)`` with random effects ``N(0, sigma2 (theta K + (1 - theta) I))``."""
    rng = np.random.default_rng(seed)
    n = kernel.n_spots if hasattr(kernel, "n_spots") else kernel.adjacency.shape[0]
    q = m - 1
    spatial = kernel.sample(n_genes * q, rng).T.reshape(n_genes, q, n).transpose(0, 2, 1)
    noise = rng.standard_normal((n_genes, n, q))
    nu = math.sqrt(sigma2) * (math.sqrt(theta) * spatial + math.sqrt(1 - theta) * noise)
    eta = np.concatenate([nu, np.zeros((n_genes, n, 1))], -1)
    p = np.exp(eta - eta.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    totals = rng.poisson(depth, (n_genes, n))
    counts = np.stack([[rng.multinomial(totals[g, s], p[g, s]) for s in range(n)]
                       for g in range(n_genes)])
    return torch.from_numpy(counts).float()


def reference_gd(Y: torch.Tensor, lam: torch.Tensor, U: torch.Tensor, sigma0: float,
                 epochs: int, lr: float, marginal: bool = False) -> dict[str, torch.Tensor]:
    """One gene, written plainly: eigenbasis l_J (``marginal``: minus 1/2 log det of the dense
    nq x nq Hessian, through a dense Cholesky every epoch), autograd, Adam (no early stopping)."""
    n, m = Y.shape
    q = m - 1
    dt = Y.dtype
    nu = torch.zeros(n, q, dtype=dt, requires_grad=True)
    bias = torch.zeros(q, dtype=dt, requires_grad=True)
    theta_logit = torch.full((1,), -3.0, dtype=dt, requires_grad=True)
    sigma = torch.tensor([sigma0], dtype=dt)
    opt = torch.optim.Adam([nu, bias, theta_logit], lr=lr)
    N = Y.sum(1)
    const = (torch.lgamma(N + 1) - torch.lgamma(Y + 1).sum(1)).sum()
    for _ in range(epochs):
        opt.zero_grad()
        eta = torch.cat([nu + bias, torch.zeros(n, 1, dtype=dt)], 1)
        logp = torch.log_softmax(eta, 1)
        l_mult = const + (Y * logp).sum()
        v = (sigma**2).clamp(min=0.01)
        theta = torch.sigmoid(theta_logit)
        c = v * (theta * lam + 1 - theta)
        z = U.T @ nu
        objective = l_mult - 0.5 * (n * q * math.log(2 * math.pi) + q * torch.log(c).sum()
                                    + (z * z / c[:, None]).sum())
        if marginal:
            p = logp.exp()[:, :q]
            W = N[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
            prior = (U / c) @ U.T  # Sigma^-1, shared by the q columns
            H = torch.kron(torch.eye(q, dtype=dt), prior) + torch.einsum(
                "sjk,st->jskt", W, torch.eye(n, dtype=dt)).reshape(n * q, n * q)
            objective = objective - torch.log(torch.diagonal(torch.linalg.cholesky(H))).sum()
        (-objective).backward()
        opt.step()
    return {"nu": nu.detach(), "bias_eta": bias.detach(), "theta_logit": theta_logit.detach()}


def bench_joint_gd(kernel, Y, lam, U, ref_genes: int) -> None:
    G = Y.shape[0]
    cfg = {"max_epochs": 500, "patience": 10**6}  # fixed trajectory length for the comparison
    model = IsoFullModel(fitting_configs=cfg)
    model.setup_data(Y, corr_sp_eigvals=lam, corr_sp_eigvecs=U)
    sigma0 = model.sigma.detach()[:, 0].clone()
    start = time.perf_counter()
    model.fit(quiet=True)
    ours = (time.perf_counter() - start) / G
    start = time.perf_counter()
    refs = [reference_gd(Y[g], lam, U, float(sigma0[g]), 500, 0.01) for g in range(ref_genes)]
    theirs = (time.perf_counter() - start) / ref_genes
    print(f"joint_gd, n={Y.shape[1]}, G={G}, 500 epochs: ours {1e3 * ours:.1f} ms/gene (batched), "
          f"per-gene pure-torch restatement {1e3 * theirs:.1f} ms/gene -> x{theirs / ours:.1f}; "
          f"max relative parameter difference (float32) {_max_rel(model, refs):.2e}")
    # the same trajectory in float64, where round-off cannot be amplified by Adam
    model64 = IsoFullModel(fitting_configs=cfg, dtype=torch.float64)
    model64.setup_data(Y[:1].double(), corr_sp_eigvals=lam.double(), corr_sp_eigvecs=U.double())
    model64.fit(quiet=True)
    ref64 = reference_gd(Y[0].double(), lam.double(), U.double(), float(sigma0[0]), 500, 0.01)
    print(f"  float64 trajectory after 500 epochs: max relative parameter difference "
          f"{_max_rel(model64, [ref64]):.2e}")


def _max_rel(model, refs: list[dict[str, torch.Tensor]]) -> float:
    diffs = []
    for g, r in enumerate(refs):
        for k, val in r.items():
            mine = getattr(model, k).detach()[g].reshape(val.shape)
            diffs.append(float((mine - val).abs().max() / val.abs().max().clamp(min=1e-6)))
    return max(diffs)


def bench_marginal_newton(kernel, lam, U, n_genes: int, theta: float, sigma2: float) -> None:
    Y = simulate(kernel, n_genes, 3, sigma2, theta, 10.0, seed=7)
    for fix in (True, False):
        model = IsoFullModel(fitting_method="marginal_newton", var_fix_sigma=fix)
        model.setup_data(Y, corr_sp_eigvals=lam, corr_sp_eigvecs=U,
                         corr_sp_precision=kernel.sparse_precision())
        if fix:
            model.update_params_from_dict({"sigma": torch.full((n_genes, 1), math.sqrt(sigma2))})
        start = time.perf_counter()
        model.fit(quiet=True)
        per_gene = (time.perf_counter() - start) / n_genes
        th = torch.sigmoid(model.theta_logit.detach()).ravel()
        s2 = (model.sigma.detach() ** 2).ravel()
        print(f"marginal_newton, n={Y.shape[1]}, G={n_genes}, sigma {'fixed at truth' if fix else 'learned'}: "
              f"{1e3 * per_gene:.1f} ms/gene, epochs {model.logger.epoch}, "
              f"converged {int(model.logger.converged.sum())}/{n_genes}; theta median "
              f"{th.quantile(0.5):.3f} (IQR {th.quantile(0.25):.3f}-{th.quantile(0.75):.3f}, truth "
              f"{theta}); sigma^2 median {s2.quantile(0.5):.3f} (truth {sigma2})")


def bench_marginal_newton_single(kernel, lam, U, n_genes: int, theta: float, sigma2: float
                                 ) -> None:
    """The same fit one gene per model (the wrapper's default ``batch_size=1``)."""
    Y = simulate(kernel, n_genes, 3, sigma2, theta, 10.0, seed=7)
    precision = kernel.sparse_precision()
    thetas, epochs = [], []
    start = time.perf_counter()
    for g in range(n_genes):
        model = IsoFullModel(fitting_method="marginal_newton")
        model.setup_data(Y[g], corr_sp_eigvals=lam, corr_sp_eigvecs=U,
                         corr_sp_precision=precision)
        model.update_params_from_dict({"sigma": torch.full((1, 1), math.sqrt(sigma2))})
        model.fit(quiet=True)
        thetas.append(float(torch.sigmoid(model.theta_logit.detach())))
        epochs.append(model.logger.epoch)
    per_gene = (time.perf_counter() - start) / n_genes
    print(f"marginal_newton, n={Y.shape[1]}, one gene per model, sigma fixed at truth: "
          f"{1e3 * per_gene:.1f} ms/gene, median epochs {int(np.median(epochs))}, theta median "
          f"{np.median(thetas):.3f} (truth {theta})")


def bench_marginal_gd(kernel, lam, U, n_genes: int, ref_genes: int, epochs: int) -> None:
    Y = simulate(kernel, n_genes, 3, 0.2, 0.5, 10.0, seed=5)
    cfg = {"max_epochs": epochs, "patience": 10**6}
    precision = kernel.sparse_precision()
    model = IsoFullModel(fitting_method="marginal_gd", var_fix_sigma=True, fitting_configs=cfg)
    model.setup_data(Y, corr_sp_eigvals=lam, corr_sp_eigvecs=U, corr_sp_precision=precision)
    sigma0 = model.sigma.detach()[:, 0].clone()
    start = time.perf_counter()
    model.fit(quiet=True)
    ours = (time.perf_counter() - start) / n_genes
    lr = model.fitting_configs["lr"]
    start = time.perf_counter()
    for g in range(ref_genes):
        reference_gd(Y[g], lam, U, float(sigma0[g]), epochs, lr, marginal=True)
    theirs = (time.perf_counter() - start) / ref_genes
    # trajectory check in float64 (one gene)
    model64 = IsoFullModel(fitting_method="marginal_gd", var_fix_sigma=True, fitting_configs=cfg,
                           dtype=torch.float64)
    model64.setup_data(Y[:1].double(), corr_sp_eigvals=lam.double(),
                       corr_sp_eigvecs=U.double(), corr_sp_precision=precision)
    model64.fit(quiet=True)
    ref64 = reference_gd(Y[0].double(), lam.double(), U.double(), float(sigma0[0]), epochs, lr,
                         marginal=True)
    print(f"marginal_gd, n={Y.shape[1]}, G={n_genes}, {epochs} epochs: ours "
          f"{1e3 * ours / epochs:.2f} ms/gene/epoch (batched, sparse factor + selected inverse), "
          f"dense-Cholesky autograd restatement {1e3 * theirs / epochs:.1f} ms/gene/epoch -> "
          f"x{theirs / ours:.1f}; float64 trajectory max relative difference "
          f"{_max_rel(model64, [ref64]):.2e}")


def bench_sparse(n_side: int, n_genes: int) -> None:
    kernel = grid_kernel(n_side)
    precision = kernel.sparse_precision()
    Y = simulate(kernel, n_genes, 3, 0.2, 0.5, 10.0, seed=3)
    model = IsoFullModel(fitting_method="marginal_newton")
    model.setup_data(Y, corr_sp_precision=precision)
    model.update_params_from_dict({"sigma": torch.full((n_genes, 1), math.sqrt(0.2))})
    start = time.perf_counter()
    model.fit(quiet=True)
    per_gene = (time.perf_counter() - start) / n_genes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    th = torch.sigmoid(model.theta_logit.detach()).ravel()
    print(f"sparse marginal_newton, n={Y.shape[1]}, G={n_genes}: {per_gene:.2f} s/gene, epochs "
          f"{model.logger.epoch}, theta {[round(float(t), 3) for t in th]} (truth 0.5), "
          f"peak RSS {peak:.2f} GiB (whole process)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--ref-genes", type=int, default=3)
    parser.add_argument("--marginal-genes", type=int, default=20)
    parser.add_argument("--gd-epochs", type=int, default=20)
    parser.add_argument("--skip-joint", action="store_true")
    parser.add_argument("--skip-sparse", action="store_true")
    parser.add_argument("--sparse-n", type=int, default=10000)
    parser.add_argument("--sparse-genes", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(machine_line())
    kernel = grid_kernel(30)
    lam, U = kernel.eigenpairs(None)
    lam, U = lam.float(), U.float()
    if not args.skip_joint:
        Y = simulate(kernel, args.genes, 3, 0.2, 0.5, 10.0, seed=1)
        bench_joint_gd(kernel, Y, lam, U, args.ref_genes)
    bench_marginal_newton(kernel, lam, U, args.marginal_genes, 0.5, 0.2)
    bench_marginal_newton_single(kernel, lam, U, args.marginal_genes, 0.5, 0.2)
    bench_marginal_gd(kernel, lam, U, args.marginal_genes, args.ref_genes, args.gd_epochs)
    if not args.skip_sparse:
        bench_sparse(int(round(math.sqrt(args.sparse_n))), args.sparse_genes)


if __name__ == "__main__":
    main()
