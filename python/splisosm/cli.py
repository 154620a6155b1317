"""Command-line interface ``splisosm-glmm``.

``splisosm-glmm demo`` simulates a small dataset with differentially used genes and runs the
differential-usage pipeline on it; ``splisosm-glmm run`` runs the pipeline on an ``.h5ad`` file.
Progress goes to stderr, tables to CSV files; user errors end with a one-line message and a
non-zero exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import pandas as pd

from splisosm.config import (
    DEFAULT_MAX_EPOCHS,
    RECOMMENDED_DU,
    RECOMMENDED_FIT,
    RECOMMENDED_SV,
    DUMethod,
    FittingMethod,
    GLMMConfig,
    ModelType,
    SVMethod,
)

_DEFAULTS = GLMMConfig()
#: The demo's smaller fits: its simulated genes need fewer epochs, and fit in one batch.
DEMO_MAX_EPOCHS, DEMO_BATCH_SIZE = 200, 200
RUN_BATCH_SIZE = 50
#: The file `run` writes into --out: the input AnnData with the analysis.
RESULTS_H5AD = "results.h5ad"

EXIT_USER_ERROR = 2
_USER_ERRORS = (ValueError, TypeError, KeyError, OSError, ImportError)


class _Examples(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help text, and the description (examples) as written."""


def _model_options(parser: argparse.ArgumentParser, *, batch_size: int, max_epochs: int) -> None:
    group = parser.add_argument_group("model options")
    group.add_argument("--model-type", default=_DEFAULTS.model_type, choices=ModelType.values(),
                       help="random effect: spatial (glmm-full), white noise (glmm-null) or none (glm)")
    group.add_argument("--fitting-method", default=RECOMMENDED_FIT, choices=FittingMethod.values(),
                       help=f"how each gene's model is fitted (the Python API's default is "
                            f"{_DEFAULTS.fitting_method}, splisosm 1.2.0's)")
    group.add_argument("--max-epochs", type=int, default=max_epochs, help="maximum epochs per fit")
    group.add_argument("--k-neighbors", type=int, default=_DEFAULTS.k_neighbors,
                       help="neighbours of each spot in the k-NN graph of the spatial kernel")
    group.add_argument("--rho", type=float, default=_DEFAULTS.rho,
                       help="spatial autocorrelation of the CAR kernel, 0 <= rho < 1")
    group.add_argument("--approx-rank", type=int, default=None,
                       help="kernel eigenpairs to keep (None: all up to 5000 spots, 4 sqrt(n) above)")
    group.add_argument("--learn-sigma", action="store_true",
                       help="learn the total variance instead of fixing it (var_fix_sigma=False)")
    group.add_argument("--batch-size", type=int, default=batch_size, help="genes fitted together per batch")
    group.add_argument("--n-jobs", type=int, default=1, help="worker processes (-1: all cores)")
    group.add_argument("--seed", type=int, default=0, help="random seed")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``splisosm-glmm``."""
    parser = argparse.ArgumentParser(
        prog="splisosm-glmm", formatter_class=_Examples,
        description="Spatially variable and differentially used RNA isoforms with a multinomial GLMM.\n\n"
                    "  splisosm-glmm demo                       simulated data, DU test, top hits\n"
                    "  splisosm-glmm demo --write-h5ad d.h5ad   ... and the data to try `run` on\n"
                    "  splisosm-glmm run d.h5ad --out res --design covariate --sv",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,run}")

    demo = sub.add_parser("demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          help="simulate data and run the differential-usage pipeline",
                          description="Simulate isoform counts on a square grid of spots (a fifth of the "
                                      "genes differentially used along one covariate), run the "
                                      "differential-usage pipeline and print the top hits.")
    demo.add_argument("--n-genes", type=int, default=200, help="genes to simulate")
    demo.add_argument("--grid", type=int, default=30, help="side of the square spot grid")
    demo.add_argument("--out", default="splisosm_demo", help="output folder for the CSV tables")
    demo.add_argument("--top", type=int, default=10, help="rows of the printed top-hits table")
    demo.add_argument("--write-h5ad", default=None, metavar="PATH",
                      help="also write the simulated data to this .h5ad file (to try `run` on)")
    _model_options(demo, batch_size=DEMO_BATCH_SIZE, max_epochs=DEMO_MAX_EPOCHS)

    run = sub.add_parser("run", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         help="run the pipeline on an .h5ad file",
                         description="Fit every gene of an AnnData .h5ad file and run the differential-"
                                     "usage test (--design) and/or the spatial-variability test (--sv). "
                                     f"Writes CSV tables and {RESULTS_H5AD} (the input with the analysis "
                                     "under uns['splisosm'], var and layers) to --out.")
    run.add_argument("input", help="AnnData .h5ad file with isoform counts")
    run.add_argument("--out", required=True, default=argparse.SUPPRESS,
                     help="output folder for the tables and the results .h5ad")
    run.add_argument("--layer", default="counts", help="adata.layers key of the isoform counts")
    run.add_argument("--group-iso-by", default="gene_symbol",
                     help="adata.var column naming the gene of each isoform")
    run.add_argument("--gene-names", default=None,
                     help="adata.var column with gene display names (None: --group-iso-by's values)")
    run.add_argument("--spatial-key", default="spatial", help="adata.obsm key of the spot coordinates")
    run.add_argument("--design", nargs="+", default=None, metavar="COLUMN",
                     help="adata.obs columns to test for differential usage")
    run.add_argument("--min-counts", type=int, default=10, help="minimum total count of an isoform")
    run.add_argument("--min-bin-pct", type=float, default=0.0,
                     help="minimum fraction (<= 1) or percentage (> 1) of spots expressing an isoform")
    run.add_argument("--du-method", default=RECOMMENDED_DU, choices=DUMethod.values(),
                     help="differential-usage test ('marginal-score' is calibrated; 'score' is "
                          "splisosm 1.2.0's conservative conditional test)")
    run.add_argument("--sv", action="store_true",
                     help="also fit the white-noise models and run the spatial-variability test")
    run.add_argument("--sv-method", default=RECOMMENDED_SV, choices=SVMethod.values(),
                     help="spatial-variability test ('score' is calibrated after any fitting method; "
                          "'llr' needs --fitting-method marginal_newton)")
    run.add_argument("--top", type=int, default=10, help="rows of each printed top-hits table")
    run.add_argument("--plots", action="store_true",
                     help="also write PNGs to OUT/plots: QQ plots, the DU volcano plot, and the observed "
                          "and fitted isoform ratios of the top genes (needs matplotlib: "
                          "pip install 'splisosm[plot]')")
    _model_options(run, batch_size=RUN_BATCH_SIZE, max_epochs=DEFAULT_MAX_EPOCHS)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("splisosm")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _make_model(args: argparse.Namespace):
    from splisosm.hyptest_glmm import SplisosmGLMM

    extra = {} if args.approx_rank is None else {"approx_rank": args.approx_rank}
    if args.model_type != ModelType.GLM:  # the GLM has a fitter of its own and no fitting options
        extra.update(fitting_method=args.fitting_method,
                     fitting_configs={"max_epochs": args.max_epochs})
    return SplisosmGLMM(
        model_type=args.model_type,
        var_fix_sigma=not args.learn_sigma,
        k_neighbors=args.k_neighbors,
        rho=args.rho,
        **extra,
    )


def _pipeline(model, args: argparse.Namespace, *, du: bool, sv: bool, du_method: str = RECOMMENDED_DU,
              sv_method: str = RECOMMENDED_SV) -> dict[str, pd.DataFrame]:
    """Fit and test; return the result tables by file stem."""
    model.fit(
        n_jobs=args.n_jobs,
        batch_size=args.batch_size,
        with_design_mtx=du and du_method == "wald",
        from_null=sv,
        random_seed=args.seed,
    )
    tables = {"training_summary": model.get_training_summary().reset_index()}
    if du:
        model.test_differential_usage(method=du_method)
        tables["du_results"] = model.get_formatted_test_results("du", with_gene_summary=True)
    if sv:
        model.test_spatial_variability(method=sv_method)
        tables["sv_results"] = model.get_formatted_test_results("sv", with_gene_summary=True)
    return tables


def _write(tables: dict[str, pd.DataFrame], out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = []
    for stem, df in tables.items():
        path = os.path.join(out, f"{stem}.csv")
        df.to_csv(path, index=False)
        paths.append(path)
    return paths


def _print_top(df: pd.DataFrame, top: int, title: str) -> None:
    cols = [c for c in ("gene", "covariate", "statistic", "pvalue", "pvalue_adj") if c in df.columns]
    print(title)
    print(df.sort_values("pvalue", kind="stable")[cols].head(top).to_string(index=False))


def _demo(args: argparse.Namespace) -> None:
    from splisosm.data.simulation import simulate_isoform_data

    start = time.perf_counter()
    adata = simulate_isoform_data(
        n_genes=args.n_genes, n_isoforms=[2 + g % 3 for g in range(args.n_genes)], grid_size=(args.grid, args.grid),
        du_fraction=0.2, effect_size=1.0, seed=args.seed,
    )
    if args.write_h5ad:
        adata.write_h5ad(args.write_h5ad)
        print(f"Simulated data written to {args.write_h5ad} (try: splisosm-glmm run {args.write_h5ad} "
              f"--out results --design {adata.uns['simulation']['covariate_names'][0]} --sv)")
    truth = adata.uns["simulation"]
    covariate = truth["covariate_names"][0]
    model = _make_model(args)
    model.setup_data(adata, layer="counts", group_iso_by="gene_symbol", group_gene_by_n_iso=True,
                     design_mtx=covariate)
    tables = _pipeline(model, args, du=True, sv=False)
    paths = _write(tables, args.out)
    du = tables["du_results"]
    _print_top(du, args.top, f"Top differential-usage hits ({model.n_genes} genes, {model.n_spots} spots):")
    genes = truth["genes"]
    du_genes = {g for g, flag in zip(genes["gene_symbol"], genes["is_du"]) if flag}
    called = set(du.loc[du["pvalue_adj"] < 0.05, "gene"])
    print(f"\n{len(called)} genes called at FDR 0.05; {len(called & du_genes)} of {len(du_genes)} "
          "simulated DU genes recovered.")
    print(f"\nResults written to: {', '.join(paths)}")
    print(f"Total time: {time.perf_counter() - start:.1f} s")


#: Genes whose isoform ratios --plots draws, from the top of each test's table.
PLOT_TOP_GENES = 3


def _plots(model, tables: dict[str, pd.DataFrame], folder: str, top: int, spatial_key: str) -> list[str]:
    """QQ plots, the volcano plot and the top genes' isoform ratios as PNGs in ``folder``."""
    from splisosm import pl

    plt = pl.pyplot()
    os.makedirs(folder, exist_ok=True)
    figures = []
    for test, result in (("du", model.du_results), ("sv", model.sv_results)):
        if result is not None:
            figures.append((f"qq_{test}", pl.qq(result, title=f"{test.upper()} p-values").figure))
    if model.du_results is not None:
        figures.append(("volcano_du", pl.volcano(model, label_top=top).figure))
    genes = []
    for stem in ("du_results", "sv_results"):
        if stem in tables:
            ranked = tables[stem].sort_values("pvalue", kind="stable")["gene"]
            genes += [g for g in ranked.drop_duplicates() if g not in genes][:PLOT_TOP_GENES]
    for gene in genes:
        figures.append((f"ratios_{gene}", pl.isoform_ratios(model, gene, spatial_key=spatial_key)))
    paths = []
    for stem, figure in figures:
        path = os.path.join(folder, f"{stem}.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_input(path: str):
    """The AnnData at ``path``; ``ValueError`` saying why when it is not a readable ``.h5ad`` file."""
    import anndata
    import h5py

    if not os.path.exists(path):
        raise ValueError(f"input file {path!r} does not exist")
    not_h5ad = f"input {path!r} is not an AnnData .h5ad file"
    if os.path.isdir(path):
        raise ValueError(f"{not_h5ad} (it is a directory)")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{not_h5ad} (it has no HDF5 signature)")
    try:
        return anndata.read_h5ad(path)
    except _USER_ERRORS as err:
        # An HDF5 file written by something other than AnnData.
        raise ValueError(f"{not_h5ad} ({_first_line(err)})") from err


def _run(args: argparse.Namespace) -> None:
    if args.design is None and not args.sv:
        raise ValueError("no test selected: pass --design COLUMN [COLUMN ...] for the differential-"
                         "usage test and/or --sv for the spatial-variability test")
    adata = _read_input(args.input)
    model = _make_model(args)
    model.setup_data(
        adata,
        spatial_key=args.spatial_key,
        layer=args.layer,
        group_iso_by=args.group_iso_by,
        gene_names=args.gene_names,
        group_gene_by_n_iso=True,
        design_mtx=args.design,
        min_counts=args.min_counts,
        min_bin_pct=args.min_bin_pct,
    )
    tables = _pipeline(model, args, du=args.design is not None, sv=args.sv, du_method=args.du_method,
                       sv_method=args.sv_method)
    paths = _write(tables, args.out)
    results = os.path.join(args.out, RESULTS_H5AD)
    model.write_results(adata).write_h5ad(results)
    paths.append(results)
    if args.plots:
        paths += _plots(model, tables, os.path.join(args.out, "plots"), args.top, args.spatial_key)
    if "du_results" in tables:
        _print_top(tables["du_results"], args.top, "Top differential-usage hits:")
    if "sv_results" in tables:
        _print_top(tables["sv_results"], args.top, "Top spatially variable genes:")
    print(f"\nResults written to: {', '.join(paths)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``splisosm-glmm``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        (_demo if args.command == "demo" else _run)(args)
    except _USER_ERRORS as err:
        print(f"splisosm-glmm: error: {_first_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
