"""Calibration and power of the SV and DU tests on held-out simulations.

Our own simulator (:func:`splisosm.data.simulation.simulate_isoform_data`): a 30 x 30 grid, 2-4
isoforms per gene, ~10 counts per spot.

* ``sv``: ``--genes`` genes, half of them null (white noise only, so the null model is exactly
  true), half with a smooth spatial effect (``theta`` 0.5). For each fitting method: the LLR
  (chi-bar-square reference) and the score test, from one ``fit(from_null=True)``.
* ``du``: ``--genes`` genes with spatial random effects everywhere; half have an effect of size
  ``beta`` on ``c1`` (iid across spots), and two null covariates are added: ``c2``, a spatially
  smooth field (a draw from the kernel), and ``b1``, a half-slide indicator. Each effect size in
  ``--effects`` is its own data set. For each configuration (fitting method, learned or fixed
  sigma): the conditional ``'score'`` and the ``'marginal-score'`` test.
* ``perm``: the LLR with the permutation null on a subset of genes (``--perm-genes``).
* ``cost``: seconds to fit and run the SV score test from a white-noise ('glmm-null') model
  alone and from ``fit(from_null=True)`` of a 'glmm-full' model, ``--genes`` genes, with the
  largest difference of their p-values.

Prints one table row per test and configuration: false-positive rate at alpha 0.05 (and at 0.01
and 0.1) on the null genes / covariates, the fraction of null p-values equal to 1, a 5-bin histogram of the null
p-values, and power.

Example::

    python bench/bench_calibration.py sv du --genes 200 --effects 0.2 0.5
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from splisosm.data.simulation import simulate_isoform_data
from splisosm.hyptest_glmm import SplisosmGLMM
from splisosm.spatial.kernel import SpatialCovKernel

ALPHA = 0.05
#: Further levels at which the false-positive rate is reported (the tails beyond ALPHA).
OTHER_LEVELS = (0.01, 0.1)
GRID = (30, 30)


def _isoforms(n_genes: int) -> list[int]:
    return [2 + g % 3 for g in range(n_genes)]


def _truth(adata, model, key: str) -> np.ndarray:
    genes = adata.uns["simulation"]["genes"]
    flags = dict(zip(genes["gene_symbol"], genes[key]))
    return np.array([flags[g] for g in model.gene_names], dtype=bool)


def _row(name: str, null_p: np.ndarray, alt_p: np.ndarray | None, seconds: float) -> dict:
    hist = np.histogram(null_p, bins=5, range=(0, 1))[0] / max(len(null_p), 1)
    return {
        "test": name,
        "n_null": int(len(null_p)),
        "fpr": float(np.mean(null_p < ALPHA)),
        "fpr_other": [round(float(np.mean(null_p < level)), 3) for level in OTHER_LEVELS],
        "p_eq_1": float(np.mean(null_p >= 1.0 - 1e-12)),
        "null_hist": [round(float(h), 2) for h in hist],
        "power": None if alt_p is None else float(np.mean(alt_p < ALPHA)),
        "seconds": round(seconds, 1),
    }


def sv_rows(n_genes: int, methods: list[str], seed: int) -> list[dict]:
    adata = simulate_isoform_data(n_genes=n_genes, n_isoforms=_isoforms(n_genes), grid_size=GRID,
                                  spatial_var=0.5, theta=0.5, sv_fraction=0.5, mean_depth=10,
                                  seed=seed)
    rows = []
    for method in methods:
        model = SplisosmGLMM(fitting_method=method)
        model.setup_data(adata, group_gene_by_n_iso=True)
        t0 = time.perf_counter()
        model.fit(from_null=True, batch_size=50, print_progress=False, random_seed=0)
        fit_s = time.perf_counter() - t0
        sv = _truth(adata, model, "is_sv")
        for test in ("llr", "score"):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = model.test_spatial_variability(method=test, return_results=True,
                                                   print_progress=False)["pvalue"]
            rows.append(_row(f"sv {test:5s} {method}", p[~sv], p[sv],
                             fit_s + time.perf_counter() - t0))
    return rows


def du_data(n_genes: int, effect: float, seed: int):
    adata = simulate_isoform_data(n_genes=n_genes, n_isoforms=_isoforms(n_genes), grid_size=GRID,
                                  spatial_var=0.5, theta=0.5, n_covariates=1,
                                  covariate="continuous", du_fraction=0.5, effect_size=effect,
                                  mean_depth=10, seed=seed)
    coords = adata.obsm["spatial"]
    kernel = SpatialCovKernel(coords, dense_threshold=0)
    smooth = kernel.sample(1, np.random.default_rng(seed + 1))[:, 0]
    adata.obs["c1"] = adata.obs.pop("covariate")
    adata.obs["c2"] = (smooth - smooth.mean()) / smooth.std()
    adata.obs["b1"] = (coords[:, 0] > np.median(coords[:, 0])).astype(float)
    return adata


DU_CONFIGS = {
    "joint_gd, fixed sigma (1.2.0 default)": {"fitting_method": "joint_gd"},
    "marginal_newton, fixed sigma": {"fitting_method": "marginal_newton"},
    "marginal_newton, learned sigma": {"fitting_method": "marginal_newton", "var_fix_sigma": False},
}


def du_rows(n_genes: int, effects: list[float], seed: int) -> list[dict]:
    rows = []
    for effect in effects:
        adata = du_data(n_genes, effect, seed)
        for label, kwargs in DU_CONFIGS.items():
            model = SplisosmGLMM(**kwargs)
            model.setup_data(adata, design_mtx=["c1", "c2", "b1"], group_gene_by_n_iso=True)
            t0 = time.perf_counter()
            model.fit(batch_size=50, print_progress=False, random_seed=0)
            fit_s = time.perf_counter() - t0
            du = _truth(adata, model, "is_du")
            for test in ("score", "marginal-score"):
                t0 = time.perf_counter()
                res = model.test_differential_usage(method=test, return_results=True,
                                                    print_progress=False)
                p = np.asarray(res["pvalue"])
                null_p = np.concatenate([p[~du, 0], p[:, 1], p[:, 2]])
                row = _row(f"du {test:14s} beta={effect} {label}", null_p, p[du, 0],
                           fit_s + time.perf_counter() - t0)
                row["fpr_c1_c2_b1"] = [round(float(np.mean(x < ALPHA)), 3)
                                       for x in (p[~du, 0], p[:, 1], p[:, 2])]
                rows.append(row)
    return rows


def perm_rows(n_genes: int, n_perms: int, seed: int) -> list[dict]:
    adata = simulate_isoform_data(n_genes=n_genes, n_isoforms=_isoforms(n_genes), grid_size=GRID,
                                  spatial_var=0.5, theta=0.5, sv_fraction=0.5, mean_depth=10,
                                  seed=seed + 7)
    model = SplisosmGLMM(fitting_method="marginal_newton")
    model.setup_data(adata, group_gene_by_n_iso=True)
    t0 = time.perf_counter()
    model.fit(from_null=True, batch_size=50, print_progress=False, random_seed=0)
    p = model.test_spatial_variability(use_perm_null=True, n_perms_per_gene=n_perms,
                                       return_results=True, print_progress=False,
                                       random_seed=seed)["pvalue"]
    sv = _truth(adata, model, "is_sv")
    return [_row(f"sv llr-perm({n_perms}) marginal_newton", p[~sv], p[sv], time.perf_counter() - t0)]


def cost_rows(n_genes: int, seed: int) -> None:
    adata = simulate_isoform_data(n_genes=n_genes, n_isoforms=_isoforms(n_genes), grid_size=GRID,
                                  spatial_var=0.5, theta=0.5, sv_fraction=0.5, mean_depth=10,
                                  seed=seed)
    pvalues = []
    for model_type, from_null in (("glmm-null", False), ("glmm-full", True)):
        model = SplisosmGLMM(model_type=model_type, fitting_method="marginal_newton")
        model.setup_data(adata, group_gene_by_n_iso=True)
        t0 = time.perf_counter()
        model.fit(from_null=from_null, batch_size=50, print_progress=False, random_seed=0)
        t1 = time.perf_counter()
        pvalues.append(model.test_spatial_variability(method="score", return_results=True,
                                                      print_progress=False)["pvalue"])
        print(f"sv score from {model_type} (from_null={from_null}): fit {t1 - t0:.2f} s, "
              f"test {time.perf_counter() - t1:.2f} s", flush=True)
    print(f"largest p-value difference {np.abs(pvalues[0] - pvalues[1]).max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", choices=["sv", "du", "perm", "cost"])
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--effects", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--sv-methods", nargs="+", default=["joint_gd", "marginal_newton"])
    parser.add_argument("--perm-genes", type=int, default=60)
    parser.add_argument("--perms", type=int, default=39)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    rows: list[dict] = []
    for part in args.parts:
        if part == "cost":
            cost_rows(args.genes, args.seed)
            continue
        if part == "sv":
            new = sv_rows(args.genes, args.sv_methods, args.seed)
        elif part == "du":
            new = du_rows(args.genes, args.effects, args.seed)
        else:
            new = perm_rows(args.perm_genes, args.perms, args.seed)
        for row in new:
            extra = f"  c1/c2/b1 {row['fpr_c1_c2_b1']}" if "fpr_c1_c2_b1" in row else ""
            power = "-" if row["power"] is None else f"{row['power']:.3f}"
            print(f"{row['test']:60s} n0={row['n_null']:4d} FPR={row['fpr']:.3f} "
                  f"FPR@{'/'.join(map(str, OTHER_LEVELS))}={row['fpr_other']} "
                  f"p=1:{row['p_eq_1']:.2f} hist={row['null_hist']} power={power}{extra} "
                  f"({row['seconds']} s)", flush=True)
        rows += new
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
