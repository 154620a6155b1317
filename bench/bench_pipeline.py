"""Whole differential-usage pipeline benchmark: setup_data + fit + score test.

Simulates ``--n-genes`` genes (2-4 isoforms) on a square grid (default 1,000 genes x 900 spots,
20 % with a covariate effect, spatial random effects everywhere) and, for each fitting method,
reports wall time, per-gene time, the converged fraction and the score test's false-positive
rate and power at alpha 0.05. Genes are grouped by isoform count and fitted in large batches
(``group_gene_by_n_iso=True``, ``--batch-size``), which is the fast way to run the GLMM.

Example::

    OMP_NUM_THREADS=1 python bench/bench_pipeline.py --methods joint_gd marginal_newton
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from splisosm.data.simulation import simulate_isoform_data
from splisosm.hyptest_glmm import SplisosmGLMM


def run(adata, method: str, batch_size: int, n_jobs: int, max_epochs: int | None) -> dict:
    configs = None if max_epochs is None else {"max_epochs": max_epochs}
    t0 = time.perf_counter()
    model = SplisosmGLMM(fitting_method=method, fitting_configs=configs)
    model.setup_data(adata, design_mtx="covariate", group_gene_by_n_iso=True)
    t1 = time.perf_counter()
    model.fit(n_jobs=n_jobs, batch_size=batch_size, print_progress=False, random_seed=0)
    t2 = time.perf_counter()
    model.test_differential_usage(print_progress=False)
    t3 = time.perf_counter()
    genes = adata.uns["simulation"]["genes"]
    is_du = dict(zip(genes["gene_symbol"], genes["is_du"]))
    truth = np.array([is_du[g] for g in model.gene_names], dtype=bool)
    pvalues = model._du_test_results["pvalue"].numpy()[:, 0]
    summary = model.get_training_summary()
    return {
        "method": method,
        "max_epochs": model.model_configs["fitting_configs"]["max_epochs"],
        "n_genes": model.n_genes,
        "n_spots": model.n_spots,
        "setup_s": round(t1 - t0, 2),
        "fit_s": round(t2 - t1, 2),
        "test_s": round(t3 - t2, 2),
        "total_s": round(t3 - t0, 2),
        "ms_per_gene": round(1000 * (t3 - t0) / model.n_genes, 2),
        "converged_fraction": round(float(summary["converged"].mean()), 3),
        "fpr_0.05": round(float(np.mean(pvalues[~truth] < 0.05)), 3),
        "power_0.05": round(float(np.mean(pvalues[truth] < 0.05)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-genes", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=["joint_gd", "marginal_newton"])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=None, help="override the default (500)")
    args = parser.parse_args()
    adata = simulate_isoform_data(
        n_genes=args.n_genes, n_isoforms=[2 + g % 3 for g in range(args.n_genes)],
        grid_size=(args.grid, args.grid), covariate="continuous", du_fraction=0.2, effect_size=0.5, seed=0,
    )
    for method in args.methods:
        print(json.dumps(run(adata, method, args.batch_size, args.n_jobs, args.max_epochs)), flush=True)


if __name__ == "__main__":
    main()
