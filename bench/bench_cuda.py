"""CUDA benchmarks: op throughput against hardware ceilings, and the whole DU pipeline.

Run on a machine with a CUDA device (see bench/GPU_RUNBOOK.md):

    python bench/bench_cuda.py ops                      # op table
    python bench/bench_cuda.py pipeline --preset small  # 1,000 genes x 900 spots
    python bench/bench_cuda.py pipeline --preset large  # 20,000 genes x 5,000 spots
    python bench/bench_cuda.py pipeline --device cpu    # the same pipeline without a GPU

``ops`` prints, per op and size, the median time, the achieved memory bandwidth (bytes the op
must move at least once) and float64 FLOP rate, each as a fraction of the device ceilings given by
``--peak-gbs`` / ``--peak-tflops`` (defaults: H200 SXM, 4,800 GB/s HBM3e and 67 TFLOP/s float64
tensor-core). Memory-bound ops (multinomial terms, fixed-effect information) should approach the
bandwidth ceiling; the Laplace ops are GEMM-bound and are compared with the FLOP ceiling.

``pipeline`` simulates a data set, then times ``setup_data``, ``fit`` and
``test_differential_usage`` of ``splisosm.SplisosmGLMM(device='cuda')`` stage by stage
(``--compare-cpu`` repeats it on the CPU). Prints markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import median_seconds  # noqa: E402

from splisosm import ops  # noqa: E402

PRESETS = {"small": (1_000, 900), "large": (20_000, 5_000)}


def cuda_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``fn`` with the device drained before and after each call."""

    def synced() -> None:
        fn()
        torch.cuda.synchronize()

    torch.cuda.synchronize()
    return median_seconds(synced, repeats=repeats, warmup=1)


def row(name: str, size: str, seconds: float, nbytes: float, flops: float | None, args) -> str:
    """A table row; ``flops=None`` for memory-bound ops, whose arithmetic is not the limit."""
    gbs = nbytes / seconds / 1e9
    rate = "-"
    if flops is not None:
        tflops = flops / seconds / 1e12
        rate = f"{tflops:.2f} ({100 * tflops / args.peak_tflops:.0f}%)"
    return (
        f"| {name} | {size} | {1e3 * seconds:.3f} | {gbs:.0f} ({100 * gbs / args.peak_gbs:.0f}%) "
        f"| {rate} |"
    )


def grid_kernel(n: int, rank: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading eigenpairs of a standardised CAR kernel on a near-square rook grid, on the GPU."""
    nx = int(math.isqrt(n))
    while n % nx:
        nx -= 1
    ny = n // nx
    idx = torch.arange(n, device="cuda").view(nx, ny)
    A = torch.zeros(n, n, dtype=torch.float64, device="cuda")
    for a, b in ((idx[:-1], idx[1:]), (idx[:, :-1], idx[:, 1:])):
        A[a.reshape(-1), b.reshape(-1)] = 1.0
        A[b.reshape(-1), a.reshape(-1)] = 1.0
    dm = A.sum(1).clamp_min(1e-12).rsqrt()
    M = torch.eye(n, dtype=torch.float64, device="cuda") - 0.99 * dm[:, None] * A * dm[None, :]
    K = torch.cholesky_inverse(torch.linalg.cholesky(M))
    s = K.diagonal().rsqrt()
    lam, V = torch.linalg.eigh(s[:, None] * K * s[None, :])
    return lam.flip(0)[:rank].to(dtype).contiguous(), V.flip(1)[:, :rank].to(dtype).contiguous()


def bench_ops(args) -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; ceilings "
          f"{args.peak_gbs:.0f} GB/s, {args.peak_tflops:.0f} TFLOP/s (float64)\n")
    print("| op | size | ms | GB/s (of peak) | TFLOP/s (of peak) |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        size_of = torch.finfo(dtype).bits // 8
        for G, n, m in ((2_000, 5_000, 3), (20_000, 900, 3), (2_000, 5_000, 6)):
            q = m - 1
            eta = 2 * torch.randn(G, n, q, device=dev, dtype=dtype)
            counts = torch.poisson(torch.full((G, n, m), 10.0 / m, device=dev, dtype=dtype))
            X = torch.randn(n, args.covariates, device=dev, dtype=dtype)
            _, resid, W = torch.ops.splisosm.multinom_terms(eta, counts)
            size = f"G={G} n={n} m={m} {str(dtype)[6:]}"
            # Reads eta and counts, writes grad and W (the per-gene sums are negligible).
            t = cuda_seconds(lambda: torch.ops.splisosm.multinom_terms(eta, counts))
            moved = G * n * (q + m + q + q * q) * size_of
            print(row("multinom_terms", size, t, moved, None, args))
            P1 = args.covariates + 1
            t = cuda_seconds(lambda: torch.ops.splisosm.fixed_effect_info(X, W, resid))
            moved = (G * n * (q * q + q) + n * (P1 - 1)) * size_of
            print(row("fixed_effect_info", size, t, moved, None, args))
            del eta, counts, X, resid, W
    # Laplace ops: float64 throughout (the kernels compute in float64 whatever the input).
    for G, n, q, rank in ((200, 900, 2, 900), (200, 900, 2, 120), (50, 5_000, 2, 283),
                          (20, 5_000, 2, 5_000)):
        lam, V = grid_kernel(n, rank)
        eta = 2 * torch.randn(G, n, q, device=dev, dtype=torch.float64)
        counts = torch.poisson(torch.full((G, n, q + 1), 10.0 / (q + 1), device=dev,
                                          dtype=torch.float64))
        _, resid, W = torch.ops.splisosm.multinom_terms(eta, counts)
        v = torch.full((G, q), 0.2, device=dev, dtype=torch.float64)
        theta = torch.full((G, q), 0.5, device=dev, dtype=torch.float64)
        rhs = resid[:, None]
        size = f"G={G} n={n} q={q} r={rank}"
        x, iters = torch.ops.splisosm.laplace_solve_eig(W, rhs, lam, V, v, theta, 1e-8, 10_000)
        its = int(iters.max())
        t = cuda_seconds(
            lambda: torch.ops.splisosm.laplace_solve_eig(W, rhs, lam, V, v, theta, 1e-8, 10_000))
        # Per iteration: two GEMMs with V over G q columns, ~6 vectors of G n q read or written.
        flops = its * 4 * n * rank * G * q
        moved = its * (6 * G * n * q + 2 * G * n * q * q + 2 * n * rank) * 8
        print(row(f"laplace_solve_eig ({its} it)", size, t, moved, flops, args))
        t = cuda_seconds(lambda: torch.ops.splisosm.laplace_logdet_eig(W, lam, V, v, theta),
                         repeats=3)
        if rank < n:  # U^T A^-1 U by one GEMM, two (q r)^3 Cholesky factors and L^T E L
            flops = G * (2 * q * q * n * rank * rank + 2 * (q * rank) ** 3)
        else:  # dense H: the prior blocks and one (n q)^3 / 3 Cholesky factor
            flops = G * (2 * q * n ** 3 + (n * q) ** 3 / 3)
        moved = G * n * q * q * 8 + n * rank * 8
        print(row("laplace_logdet_eig", size, t, moved, flops, args))
        if rank < n:  # the direct low-rank solve: same factorisations plus a few GEMVs
            t = cuda_seconds(lambda: torch.ops.splisosm.laplace_lowrank(W, rhs, lam, V, v, theta),
                             repeats=3)
            print(row("laplace_lowrank", size, t, moved + G * n * q * 16, flops, args))
        del W, resid, eta, counts, rhs, x


def bench_pipeline(args) -> None:
    from splisosm import SplisosmGLMM
    from splisosm.data.simulation import simulate_isoform_data

    genes, spots = PRESETS[args.preset]
    genes, spots = args.genes or genes, args.spots or spots
    side = math.isqrt(spots)
    layout = {"grid_size": (side, side)} if side * side == spots else {"n_spots": spots}
    start = time.perf_counter()
    adata = simulate_isoform_data(n_genes=genes, n_isoforms=3, du_fraction=0.2, seed=0, **layout)
    t_sim = time.perf_counter() - start
    print(f"{genes} genes x {spots} spots ({args.method}, max_epochs {args.max_epochs}, "
          f"batch {args.batch_size}); simulation {t_sim:.1f} s\n")
    print("| device | setup_data s | fit s | DU test s | total s | fit ms/gene |")
    print("|---|---|---|---|---|---|")
    devices = [args.device] + (["cpu"] if args.compare_cpu and args.device != "cpu" else [])
    for device in devices:
        model = SplisosmGLMM(model_type="glmm-full", fitting_method=args.method,
                             fitting_configs={"max_epochs": args.max_epochs}, device=device)
        stages = []

        def timed(fn: Callable[[], object]) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            stages.append(time.perf_counter() - t0)

        timed(lambda: model.setup_data(adata, layer="counts", group_iso_by="gene_symbol",
                                       group_gene_by_n_iso=True, design_mtx="covariate"))
        timed(lambda: model.fit(batch_size=args.batch_size, print_progress=False))
        if args.du_test:
            timed(lambda: model.test_differential_usage(method="score", print_progress=False))
            pvals = model.get_formatted_test_results("du")["pvalue"]
            assert pvals.notna().all(), "DU test produced NaN p-values"
        du = f"{stages[2]:.1f}" if args.du_test else "-"
        print(f"| {device} | {stages[0]:.1f} | {stages[1]:.1f} | {du} | "
              f"{sum(stages):.1f} | {1e3 * stages[1] / genes:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p_ops = sub.add_parser("ops", help="op throughput against bandwidth / FLOP ceilings")
    p_ops.add_argument("--covariates", type=int, default=2)
    p_ops.add_argument("--peak-gbs", type=float, default=4_800.0)
    p_ops.add_argument("--peak-tflops", type=float, default=67.0)
    p_pipe = sub.add_parser("pipeline", help="simulate + setup_data + fit + DU test")
    p_pipe.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p_pipe.add_argument("--genes", type=int, default=None, help="override the preset's genes")
    p_pipe.add_argument("--spots", type=int, default=None, help="override the preset's spots")
    p_pipe.add_argument("--method", default="joint_gd")
    p_pipe.add_argument("--max-epochs", type=int, default=500)
    p_pipe.add_argument("--batch-size", type=int, default=1_000)
    p_pipe.add_argument("--compare-cpu", action="store_true")
    p_pipe.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same pipeline without a GPU (the CPU side of a ratio)")
    p_pipe.add_argument("--no-du-test", dest="du_test", action="store_false",
                        help="time setup_data and fit only")
    args = parser.parse_args()
    if args.what == "pipeline" and args.device == "cpu":
        bench_pipeline(args)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_cuda.py needs a CUDA device")
    if not ops.has_native_kernel("multinom_terms", torch.device("cuda")):
        sys.exit("splisosm was built without CUDA kernels (torch with CUDA needed at build time)")
    if args.what == "ops":
        bench_ops(args)
    else:
        bench_pipeline(args)


if __name__ == "__main__":
    main()
