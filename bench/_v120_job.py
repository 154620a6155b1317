"""One benchmark job, run unchanged under our splisosm and under splisosm 1.2.0.

Started by ``bench/bench_vs_v120.py`` as a subprocess of each interpreter; not meant to be run by
hand (but it can be: ``python bench/_v120_job.py --h5ad data.h5ad --workload du --out r.json``).
It uses only the public API that both packages share, and prints/writes one JSON object:

* ``package``: ``splisosm.__version__``, ``torch``: ``torch.__version__``, ``threads``;
* ``times``: wall seconds of ``setup`` (``setup_data``; for ``pergene`` the kernel and its
  eigendecomposition), ``fit``, ``test`` (``test_*`` + formatting the results), ``objective``
  (reconstructing the fitted models to read the objective, not part of the comparison);
* ``objective``: per gene, the negative objective of the fitted model, ``-model()`` (the public
  ``forward()``: joint log-likelihood for ``joint_*``, Laplace marginal for ``marginal_*``), read
  from ``get_fitted_models()`` (pipeline) or from the ``IsoFullModel`` itself (per-gene API);
* ``best_loss``: per gene, ``get_training_summary()['best_loss']`` (pipelines; 1.2.0 reports NaN
  there for batched fits, spec quirk Q1, so it is recorded but not compared);
* ``pvalues``: ``{"gene|covariate": p}`` (DU) or ``{"gene": p}`` (SV);
* ``n_isos``: per gene, the isoform count of the fitted model (alignment check);
* ``peak_rss_mb``: ``ru_maxrss`` of the job process at the end, and after set-up.

Bridged API differences (both spellings are tried, ours first):

* ``IsoFullModel``: ``splisosm.hyptest_glmm`` (API page, ours) vs ``splisosm.hyptest.glmm``
  (where 1.2.0 actually has it; 1.2.0 has no ``splisosm.hyptest_glmm``).
* Kernel eigenpairs: ``SpatialCovKernel.eigendecomposition()`` then the ``K_eigvals`` /
  ``K_eigvecs`` attributes (1.2.0 returns ``None`` from ``eigendecomposition()``; ours returns the
  pair, and our ``eigenvalues()`` alone does not set ``K_eigvecs`` while 1.2.0's does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import warnings


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _approx_rank(value: str):
    if value == "auto":
        return {}
    if value == "none":
        return {"approx_rank": None}
    return {"approx_rank": int(value)}


def _import_iso_full_model():
    try:
        from splisosm.hyptest_glmm import IsoFullModel  # API page spelling (ours)
    except ImportError:
        from splisosm.hyptest.glmm import IsoFullModel  # splisosm 1.2.0 layout
    return IsoFullModel


def _float(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def run_pipeline(args, adata, torch) -> dict:
    from splisosm import SplisosmGLMM

    out: dict = {"times": {}}
    covariates = [c for c in adata.obs.columns if c.startswith("covariate")]
    fitting_configs = {"max_epochs": args.max_epochs} if args.max_epochs else None
    ctor = dict(model_type="glmm-full", fitting_method=args.fitting_method, **_approx_rank(args.approx_rank))
    if fitting_configs is not None:
        ctor["fitting_configs"] = fitting_configs
    model = SplisosmGLMM(**ctor)

    t0 = time.perf_counter()
    setup_kwargs = dict(layer="counts", group_iso_by="gene_symbol", group_gene_by_n_iso=True)
    if args.test == "du":
        setup_kwargs["design_mtx"] = covariates
    model.setup_data(adata, **setup_kwargs)
    out["times"]["setup"] = time.perf_counter() - t0
    out["peak_rss_mb_setup"] = _rss_mb()

    t0 = time.perf_counter()
    model.fit(n_jobs=1, batch_size=args.batch_size, quiet=True, print_progress=False,
              from_null=(args.test == "sv"), random_seed=0)
    out["times"]["fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if args.test == "du":
        model.test_differential_usage(method="score", print_progress=False)
        df = model.get_formatted_test_results("du")
        pvals = {f"{g}|{c}": _float(p) for g, c, p in zip(df["gene"], df["covariate"], df["pvalue"])}
    else:
        model.test_spatial_variability(method="llr", print_progress=False)
        df = model.get_formatted_test_results("sv")
        pvals = {str(g): _float(p) for g, p in zip(df["gene"], df["pvalue"])}
    out["times"]["test"] = time.perf_counter() - t0
    out["pvalues"] = pvals

    t0 = time.perf_counter()
    names = [str(g) for g in model.gene_names]
    summary = model.get_training_summary()
    out["best_loss"] = {str(g): _float(v) for g, v in zip(summary.index, summary["best_loss"])}
    objective, n_isos = {}, {}
    with torch.no_grad():
        for name, fitted in zip(names, model.get_fitted_models()):
            objective[name] = _float(-fitted().sum())
            n_isos[name] = int(fitted.n_isos)
    out["times"]["objective"] = time.perf_counter() - t0
    out["objective"] = objective
    out["n_isos"] = n_isos
    out["n_genes"] = len(names)
    out["n_spots"] = int(model.n_spots)
    return out


def run_pergene(args, adata, torch) -> dict:
    import numpy as np

    from splisosm.kernel import SpatialCovKernel

    IsoFullModel = _import_iso_full_model()
    out: dict = {"times": {}}
    t0 = time.perf_counter()
    kernel = SpatialCovKernel(np.asarray(adata.obsm["spatial"], dtype=np.float64), k_neighbors=4, rho=0.99)
    kernel.eigendecomposition()
    evals, evecs = kernel.K_eigvals, kernel.K_eigvecs
    out["times"]["setup"] = time.perf_counter() - t0
    out["peak_rss_mb_setup"] = _rss_mb()
    out["kernel_dtype"] = str(evecs.dtype)

    counts = np.asarray(adata.layers["counts"], dtype=np.float32)
    genes = adata.var["gene_symbol"].astype(str).to_numpy()
    names = list(dict.fromkeys(genes))
    objective, n_isos, per_gene_s = {}, {}, {}
    fit_total = 0.0
    for name in names:
        y = torch.from_numpy(counts[:, genes == name].copy())
        t0 = time.perf_counter()
        model = IsoFullModel(fitting_method=args.fitting_method,
                             fitting_configs={"max_epochs": args.max_epochs or 100})
        model.setup_data(y, corr_sp_eigvals=evals, corr_sp_eigvecs=evecs)
        model.fit(quiet=True, random_seed=0)
        dt = time.perf_counter() - t0
        fit_total += dt
        per_gene_s[name] = dt
        with torch.no_grad():
            objective[name] = _float(-model().sum())
        n_isos[name] = int(model.n_isos)
    out["times"]["fit"] = fit_total
    out["times"]["test"] = 0.0
    out["per_gene_s"] = per_gene_s
    out["objective"] = objective
    out["n_isos"] = n_isos
    out["pvalues"] = {}
    out["n_genes"] = len(names)
    out["n_spots"] = int(counts.shape[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--h5ad", required=True)
    ap.add_argument("--kind", choices=["pipeline", "pergene"], default="pipeline")
    ap.add_argument("--test", choices=["du", "sv"], default="du")
    ap.add_argument("--fitting-method", default="joint_gd")
    ap.add_argument("--approx-rank", default="auto", help="auto | none | <int>")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--max-epochs", type=int, default=0, help="0: package default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import anndata as ad

    import splisosm

    warnings.simplefilter("ignore")
    adata = ad.read_h5ad(args.h5ad)
    t0 = time.perf_counter()
    result = (run_pergene if args.kind == "pergene" else run_pipeline)(args, adata, torch)
    result["times"]["total"] = time.perf_counter() - t0
    result.update(
        package=getattr(splisosm, "__version__", "unknown"),
        package_path=os.path.dirname(splisosm.__file__),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        threads=torch.get_num_threads(),
        python=sys.version.split()[0],
        peak_rss_mb=_rss_mb(),
    )
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
