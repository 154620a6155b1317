"""The splisosm-glmm command line: demo, run, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from splisosm.cli import main
from splisosm.data.simulation import simulate_isoform_data

pytestmark = pytest.mark.slow

FAST = ["--max-epochs", "30", "--batch-size", "50"]


def test_demo_small(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--n-genes", "15", "--grid", "8", "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert "Top differential-usage hits" in captured.out and str(out) in captured.out
    assert "Fitting" in captured.err  # progress on stderr
    du = pd.read_csv(out / "du_results.csv")
    assert list(du.columns[:5]) == ["gene", "covariate", "statistic", "pvalue", "pvalue_adj"]
    assert len(du) == 15
    summary = pd.read_csv(out / "training_summary.csv")
    assert list(summary.columns) == ["gene", "model_type", "converged", "best_loss", "best_epoch", "fitting_time_s"]


@pytest.fixture
def h5ad(tmp_path):
    adata = simulate_isoform_data(n_genes=6, n_isoforms=[2, 3] * 3, grid_size=(8, 8), du_fraction=0.5, seed=4)
    adata.var["label"] = [f"L_{g}" for g in adata.var["gene_symbol"]]
    path = tmp_path / "data.h5ad"
    adata.write_h5ad(path)
    return path


def test_run_writes_tables(h5ad, tmp_path, capsys) -> None:
    out = tmp_path / "res"
    code = main(["run", str(h5ad), "--out", str(out), "--design", "covariate", "--gene-names", "label",
                 "--sv", *FAST])
    assert code == 0
    for stem in ("du_results", "sv_results", "training_summary"):
        table = pd.read_csv(out / f"{stem}.csv")
        assert len(table) == 6 and table["gene"].str.startswith("L_").all()
    assert "Top spatially variable genes" in capsys.readouterr().out


def test_run_glm_wald(h5ad, tmp_path) -> None:
    out = tmp_path / "wald"
    assert main(["run", str(h5ad), "--out", str(out), "--design", "covariate", "--model-type", "glm",
                 "--du-method", "wald"]) == 0
    assert (out / "du_results.csv").exists() and not (out / "sv_results.csv").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layer", "raw"], "layer"),
        (["--design", "nope"], "nope"),
        (["--group-iso-by", "gene"], "group_iso_by"),
    ],
)
def test_run_user_errors_are_one_line(h5ad, tmp_path, capsys, extra, message) -> None:
    assert main(["run", str(h5ad), "--out", str(tmp_path / "x"), "--sv", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splisosm-glmm: error:") and message in err[0]


def test_missing_input_file(tmp_path, capsys) -> None:
    assert main(["run", str(tmp_path / "none.h5ad"), "--out", str(tmp_path), "--sv"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point_exit_status(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "splisosm.cli", "run", str(tmp_path / "none.h5ad"), "--out", str(tmp_path), "--sv"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    usage = subprocess.run([sys.executable, "-m", "splisosm.cli"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_calibrated_configuration_is_the_default() -> None:
    from splisosm.cli import build_parser

    for command in (["run", "data.h5ad", "--out", "res"], ["demo"]):
        args = build_parser().parse_args(command)
        assert args.fitting_method == "marginal_newton"
    args = build_parser().parse_args(["run", "data.h5ad", "--out", "res"])
    assert args.du_method == "marginal-score" and args.sv_method == "score"


def test_run_sv_llr(h5ad, tmp_path) -> None:
    out = tmp_path / "llr"
    assert main(["run", str(h5ad), "--out", str(out), "--sv", "--sv-method", "llr", *FAST]) == 0
    table = pd.read_csv(out / "sv_results.csv")
    assert len(table) == 6 and table["pvalue"].between(0, 1).all()


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    from splisosm import __version__

    assert capsys.readouterr().out.strip() == f"splisosm-glmm {__version__}"


@pytest.mark.parametrize("command", ["demo", "run"])
def test_every_option_says_what_it_does_and_its_default(command, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    parser_actions = [a for a in _subparser(command)._actions if a.option_strings and a.dest != "help"]
    for action in parser_actions:
        assert action.help, action.option_strings
        if action.default not in (None, False, "==SUPPRESS==") and action.nargs != 0:
            assert f"(default: {action.default})" in " ".join(text.split()), action.option_strings


def _subparser(name: str):
    from splisosm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name]


def test_run_without_a_test_is_an_error(h5ad, tmp_path, capsys) -> None:
    assert main(["run", str(h5ad), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "no test selected" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_demo_writes_data_that_run_takes_and_run_writes_the_results_h5ad(tmp_path, capsys) -> None:
    import anndata as ad

    data = tmp_path / "demo.h5ad"
    assert main(["demo", "--n-genes", "6", "--grid", "8", "--out", str(tmp_path / "demo"),
                 "--write-h5ad", str(data), *FAST]) == 0
    assert f"splisosm-glmm run {data}" in capsys.readouterr().out
    out = tmp_path / "res"
    assert main(["run", str(data), "--out", str(out), "--design", "covariate", "--sv", *FAST]) == 0
    results = ad.read_h5ad(out / "results.h5ad")
    assert set(results.uns["splisosm"]) >= {"du_results", "sv_results", "training_summary", "config"}
    du = pd.read_csv(out / "du_results.csv")
    stored = results.uns["splisosm"]["du_results"]
    assert list(stored["gene"]) == list(du["gene"])
    assert "splisosm_fitted_ratios" in results.layers and results.shape == ad.read_h5ad(data).shape


def test_run_plots_writes_pngs_of_the_tests_and_top_genes(h5ad, tmp_path) -> None:
    import matplotlib.image

    out = tmp_path / "res"
    assert main(["run", str(h5ad), "--out", str(out), "--design", "covariate", "--sv", "--plots", *FAST]) == 0
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert {"qq_du.png", "qq_sv.png", "volcano_du.png"} <= set(pngs)
    top = pd.read_csv(out / "du_results.csv").sort_values("pvalue")["gene"].iloc[0]
    assert f"ratios_{top}.png" in pngs
    for name in pngs:
        image = matplotlib.image.imread(out / "plots" / name)
        assert image.shape[0] > 100 and (image[..., :3] < 0.95).mean() > 0.01, name  # not blank
