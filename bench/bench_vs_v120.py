"""Side-by-side benchmark: our splisosm vs the published splisosm 1.2.0, same data, same settings.

Every speed claim of the project is a ratio measured by this script. It

1. creates (or reuses) a virtualenv holding ``splisosm==1.2.0`` and its dependencies *outside* the
   repository (default ``~/.cache/splisosm-bench/venv-1.2.0``; ``--venv`` or the environment
   variable ``SPLISOSM_BENCH_V120_VENV`` override it), with ``torch==2.13.0`` (``--v120-torch``),
   which pip resolves to the CPU wheel on our machines (checked: a CUDA build is reported);
2. measures "ours" either as installed in this interpreter (``--ours-python``; an editable
   install measures whatever the working tree holds, uncommitted edits of others included, and
   the report says so) or, with ``--ours-ref GIT_REF``, as that commit exported with
   ``git archive`` and built into its own virtualenv ``~/.cache/splisosm-bench/venv-ours-<sha>``
   (``--cache-dir`` / ``SPLISOSM_BENCH_CACHE``; built once, reused) -- the reproducible mode;
3. simulates each data set once with our ``splisosm.data.simulation.simulate_isoform_data`` (of the
   measured install) and writes it to an ``.h5ad`` in a temporary directory (``--workdir`` keeps
   it and the per-job JSON files), then runs one job script, ``bench/_v120_job.py`` (public API
   common to both packages only), on that file under our interpreter and under the 1.2.0 venv,
   one after the other, with the same thread settings (``--threads``, default 1:
   ``torch.set_num_threads`` and ``OMP/MKL/OPENBLAS_NUM_THREADS``);
4. prints a table per workload: set-up / fit / test wall times and their ratios 1.2.0 / ours, the
   largest relative difference of the per-gene final objective (``-model()`` of each fitted model:
   the negative joint log-likelihood for ``joint_*``, the negative Laplace marginal for
   ``marginal_*``), the largest ``|log10 p_ours - log10 p_1.2.0|`` over the tests where both
   p-values exceed 1e-10, the number of calls at p < 0.05 that disagree, and peak RSS.

Workloads (``--workloads``, default ``du du10k sv pergene``):

* ``du``: 200 genes x 900 spots (30 x 30 grid), 2-4 isoforms, 3 binary covariates;
  ``SplisosmGLMM()`` defaults (glmm-full, joint_gd, 500 epochs),
  ``setup_data(..., group_gene_by_n_iso=True, design_mtx=[3 covariate columns])``,
  ``fit(batch_size=20)``, ``test_differential_usage(method='score')``.
* ``du10k``: the same at 10,000 spots (100 x 100 grid), 6 genes (approx_rank auto = 400).
* ``sv``: 100 genes x 900 spots, ``fit(from_null=True, batch_size=50)`` +
  ``test_spatial_variability(method='llr')``.
* ``pergene``: ``IsoFullModel(fitting_method='joint_gd', fitting_configs={'max_epochs': 100})``,
  ``setup_data(counts, corr_sp_eigvals=, corr_sp_eigvecs=)`` with the eigenpairs of each package's
  own ``SpatialCovKernel`` of the same coordinates, 20 genes x 900 spots, one gene at a time.
* ``du-marginal``: the ``du`` data and settings with ``fitting_method='marginal_newton'`` (the fit
  the README recommends), 50 genes.
* ``exact-joint`` / ``exact-marginal``: the ``du10k`` data with ``approx_rank=None`` and
  ``joint_gd`` / ``marginal_newton``. Ours only, unless ``--v120-exact`` (1.2.0 asks its iterative
  eigensolver for n - 2 eigenpairs there, spec quirk Q16); that 1.2.0 run is then killed after
  ``--v120-exact-timeout`` seconds and reported as not run.
* ``exact-marginal-50k``: ``exact-marginal`` on a 224 x 224 grid (50,176 spots), 4 genes; ours
  only (the exact route's memory and time at the scale of a large slide).

Gene counts can be lowered with ``--genes WORKLOAD=N`` (e.g. ``--genes du=100``). With
``--repeats N`` each job runs N times, the two sides alternating which goes first, and the times
reported are the minimum over the repeats (the machine is shared; results are from the first).

Example (the command whose figures are in RESULTS.md, with the commit measured)::

    python bench/bench_vs_v120.py --ours-ref HEAD --threads 1 --repeats 2 --markdown vs_v120.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
JOB = HERE / "_v120_job.py"
DEFAULT_VENV = Path.home() / ".cache" / "splisosm-bench" / "venv-1.2.0"
P_FLOOR = 1e-10
ALPHA = 0.05

# name -> (data set, job arguments, default genes, 1.2.0 run by default)
DATASETS = {
    "grid30": dict(grid_size=(30, 30), n_covariates=3),
    "grid100": dict(grid_size=(100, 100), n_covariates=3),
    "grid224": dict(grid_size=(224, 224), n_covariates=3),
}
_EXACT_MARGINAL_JOB = ["--kind", "pipeline", "--test", "du", "--batch-size", "20",
                       "--approx-rank", "none", "--fitting-method", "marginal_newton"]
WORKLOADS = {
    "du": dict(data="grid30", genes=200, job=["--kind", "pipeline", "--test", "du", "--batch-size", "20"],
               label="DU pipeline, 900 spots, joint_gd 500 ep, batch 20, score test"),
    "du10k": dict(data="grid100", genes=6, job=["--kind", "pipeline", "--test", "du", "--batch-size", "20"],
                  label="DU pipeline, 10,000 spots, approx_rank auto, joint_gd 500 ep, score test"),
    "sv": dict(data="grid30", genes=100, job=["--kind", "pipeline", "--test", "sv", "--batch-size", "50"],
               label="SV pipeline, 900 spots, fit(from_null=True), batch 50, LLR test"),
    "pergene": dict(data="grid30", genes=20,
                    job=["--kind", "pergene", "--fitting-method", "joint_gd", "--max-epochs", "100"],
                    label="per-gene IsoFullModel, 900 spots, joint_gd 100 ep, full-rank eigenpairs"),
    "du-marginal": dict(data="grid30", genes=50,
                        job=["--kind", "pipeline", "--test", "du", "--batch-size", "20",
                             "--fitting-method", "marginal_newton"],
                        label="DU pipeline, 900 spots, marginal_newton (the calibrated fit), batch 20, score test"),
    "exact-joint": dict(data="grid100", genes=6, v120=False,
                        job=["--kind", "pipeline", "--test", "du", "--batch-size", "20",
                             "--approx-rank", "none", "--fitting-method", "joint_gd"],
                        label="DU pipeline, 10,000 spots, approx_rank=None, joint_gd"),
    "exact-marginal": dict(data="grid100", genes=6, v120=False, job=_EXACT_MARGINAL_JOB,
                           label="DU pipeline, 10,000 spots, approx_rank=None, marginal_newton"),
    "exact-marginal-50k": dict(data="grid224", genes=4, v120=False, job=_EXACT_MARGINAL_JOB,
                               label="DU pipeline, 50,176 spots, approx_rank=None, marginal_newton"),
}
DEFAULT_WORKLOADS = ["du", "du10k", "sv", "pergene"]


# --------------------------------------------------------------------------- environment
def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _probe(python: Path | str, env: dict | None = None) -> dict | None:
    code = ("import json, splisosm, torch; print(json.dumps({'splisosm': getattr(splisosm, "
            "'__version__', '?'), 'path': splisosm.__file__, 'torch': torch.__version__, "
            "'cuda': torch.version.cuda}))")
    try:
        res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env,
                             cwd=tempfile.gettempdir(), timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def _clean_env(threads: int, for_v120: bool) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if for_v120:
        # a PYTHONPATH pointing at our python/ would shadow 1.2.0
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
    return env


def ensure_v120_venv(venv: Path, torch_version: str, reinstall: bool) -> dict:
    venv = venv.expanduser().resolve()
    if venv == REPO or REPO in venv.parents:
        sys.exit(f"the 1.2.0 virtualenv must live outside the repository, not in {venv}")
    python = _venv_python(venv)
    info = None if reinstall or not python.exists() else _probe(python, _clean_env(1, True))
    if info is None or info["splisosm"] != "1.2.0":
        print(f"[setup] creating the splisosm 1.2.0 virtualenv in {venv}", file=sys.stderr)
        if reinstall and venv.exists():
            shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                        "splisosm==1.2.0", f"torch=={torch_version}"], check=True)
        info = _probe(python, _clean_env(1, True))
        if info is None or info["splisosm"] != "1.2.0":
            sys.exit(f"splisosm 1.2.0 did not import from {python}: {info}")
    if info["cuda"] is not None:
        print(f"[setup] WARNING: the 1.2.0 venv has a CUDA torch build ({info['torch']}, CUDA "
              f"{info['cuda']}); expected the CPU wheel", file=sys.stderr)
    info["python"] = str(python)
    return info


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def ensure_ours_venv(ref: str, cache: Path, torch_version: str, reinstall: bool) -> Path:
    """Build commit ``ref`` of this repository into its own virtualenv; return its python.

    The commit is exported with ``git archive`` (committed files only, so other people's
    uncommitted edits in the working tree do not leak in) to ``cache/src-<sha>`` and installed with
    the README's recipe into ``cache/venv-ours-<sha>``; both are reused on later runs.
    """
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    tag = sha[:12]
    venv, src = cache / f"venv-ours-{tag}", cache / f"src-{tag}"
    python = _venv_python(venv)
    marker = venv / "splisosm-commit.txt"
    if not reinstall and marker.exists() and marker.read_text().strip() == sha:
        return python
    print(f"[setup] building our splisosm at {tag} into {venv}", file=sys.stderr)
    for path in (venv, src):
        if path.exists():
            shutil.rmtree(path)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", sha],
                             check=True, capture_output=True).stdout
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        try:
            tar.extractall(src, filter="data")
        except TypeError:  # Python without extraction filters
            tar.extractall(src)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"torch=={torch_version}",
                    "cmeel-eigen", "scikit-build-core", "cmake", "ninja"], check=True)
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2"))
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-build-isolation", str(src)],
                   check=True, env=env, cwd=str(cache))
    marker.write_text(sha + "\n")
    return python


def _ours_provenance(info: dict) -> str:
    """Where our measured package comes from: a commit, or a (possibly dirty) checkout."""
    if info.get("commit"):
        return f"commit {info['commit'][:12]} (clean export, own venv)"
    pkg = Path(info["path"]).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--show-toplevel"], check=True,
                             capture_output=True, text=True).stdout.strip()
        desc = subprocess.run(["git", "-C", top, "describe", "--always", "--dirty"], check=True,
                              capture_output=True, text=True).stdout.strip()
        return f"editable install of the checkout {top} at {desc}"
    except (subprocess.CalledProcessError, OSError):
        return f"installed package at {pkg}"


# --------------------------------------------------------------------------- data
_SIMULATE = """
import sys, numpy as np
from splisosm.data.simulation import simulate_isoform_data
path, nx, ny, n_cov, n_genes, seed = sys.argv[1], *map(int, sys.argv[2:])
n_isoforms = [int(m) for m in np.random.default_rng(seed + 1).integers(2, 5, size=n_genes)]
adata = simulate_isoform_data(
    n_genes=n_genes, n_isoforms=n_isoforms, grid_size=(nx, ny), n_covariates=n_cov,
    covariate="binary", covariate_pattern="random", du_fraction=0.2, sv_fraction=0.5, seed=seed)
adata.write_h5ad(path)
"""


def simulate(python: str, dataset: str, n_genes: int, seed: int, workdir: Path) -> Path:
    """Simulate with *our* ``simulate_isoform_data`` (of the measured install) once per data set.

    Genes get 2-4 isoforms, 20 % differential usage (binary covariates, +-1 on the logit scale),
    50 % spatially variable (theta 0.5), mean depth 10 per spot.
    """
    path = workdir / f"{dataset}_g{n_genes}_s{seed}.h5ad"
    if not path.exists():
        spec = DATASETS[dataset]
        subprocess.run([python, "-c", _SIMULATE, str(path), *map(str, spec["grid_size"]),
                        str(spec["n_covariates"]), str(n_genes), str(seed)],
                       check=True, cwd=str(workdir), env=_clean_env(1, False))
    return path


# --------------------------------------------------------------------------- running
def run_job(python: str, h5ad: Path, job_args: list[str], threads: int, for_v120: bool,
            timeout: float, workdir: Path, tag: str) -> dict:
    out = workdir / f"{tag}.json"
    cmd = [python, str(JOB), "--h5ad", str(h5ad), "--threads", str(threads), "--out", str(out),
           *job_args]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(workdir),
                             env=_clean_env(threads, for_v120))
    except subprocess.TimeoutExpired:
        return {"status": f"not run (killed after {timeout:.0f} s)", "load_before": load}
    wall = time.perf_counter() - t0
    if res.returncode != 0 or not out.exists():
        tail = (res.stderr or res.stdout).strip().splitlines()[-15:]
        return {"status": "failed", "error": "\n".join(tail), "load_before": load}
    result = json.loads(out.read_text())
    result.update(status="ok", wall_s=wall, load_before=load)
    return result


def _merge_repeats(reps: list[dict]) -> dict:
    """First repeat's results with each time replaced by its minimum over the repeats."""
    first = dict(reps[0])
    ok = [r for r in reps if r.get("status") == "ok"]
    if first.get("status") != "ok" or len(ok) < 2:
        return first
    first["times"] = {k: min(r["times"][k] for r in ok) for k in first["times"]}
    first["times_all"] = [r["times"] for r in ok]
    first["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    first["load_before"] = max(r["load_before"] for r in ok)
    return first


# --------------------------------------------------------------------------- comparison
def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def compare(ours: dict, ref: dict) -> dict:
    cmp: dict = {}
    for key in ("setup", "fit", "test", "total"):
        cmp[f"{key}_ratio"] = _ratio(ref["times"].get(key), ours["times"].get(key))
    # per-gene objective
    rel, worst = [], None
    common = sorted(set(ours["objective"]) & set(ref["objective"]))
    for gene in common:
        a, b = ours["objective"][gene], ref["objective"][gene]
        if a is None or b is None:
            continue
        r = (a - b) / max(abs(b), 1e-12)
        rel.append(r)
        if worst is None or abs(r) > abs(worst[1]):
            worst = (gene, r, a, b)
    cmp["objective_genes"] = len(rel)
    cmp["objective_max_rel"] = max((abs(r) for r in rel), default=None)
    cmp["objective_median_rel"] = sorted(abs(r) for r in rel)[len(rel) // 2] if rel else None
    cmp["objective_worst"] = worst
    cmp["objective_ours_lower"] = sum(r < -1e-6 for r in rel)
    cmp["objective_ours_higher"] = sum(r > 1e-6 for r in rel)
    cmp["n_isos_mismatch"] = [g for g in common if ours["n_isos"].get(g) != ref["n_isos"].get(g)]
    # p-values
    diffs, worst_p, below, discord, n_tests = [], None, 0, 0, 0
    for key in sorted(set(ours["pvalues"]) & set(ref["pvalues"])):
        a, b = ours["pvalues"][key], ref["pvalues"][key]
        if a is None or b is None:
            continue
        n_tests += 1
        discord += (a < ALPHA) != (b < ALPHA)
        if a > P_FLOOR and b > P_FLOOR:
            d = abs(math.log10(a) - math.log10(b))
            diffs.append(d)
            if worst_p is None or d > worst_p[1]:
                worst_p = (key, d, a, b)
        elif (a > P_FLOOR) != (b > P_FLOOR):
            below += 1
    cmp["p_tests"] = n_tests
    cmp["p_compared"] = len(diffs)
    cmp["p_max_log10_diff"] = max(diffs, default=None)
    cmp["p_median_log10_diff"] = sorted(diffs)[len(diffs) // 2] if diffs else None
    cmp["p_worst"] = worst_p
    cmp["p_one_below_floor"] = below
    cmp["p_discordant_calls"] = discord
    cmp["p_sig_ours"] = sum(p is not None and p < ALPHA for p in ours["pvalues"].values())
    cmp["p_sig_v120"] = sum(p is not None and p < ALPHA for p in ref["pvalues"].values())
    return cmp


def _fmt(x, digits=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.2e}"
        return f"{x:.{digits}f}"
    return str(x)


def report(results: dict, meta: dict) -> tuple[str, str]:
    """Plain-text and markdown renderings of the results."""
    lines, md = [], []
    md.append("| workload | genes x spots | side | setup s | fit s | test s | fit ratio 1.2.0/ours | "
              "max rel. objective diff | max abs log10 p diff (p > 1e-10) | p < 0.05 calls (ours / 1.2.0, "
              "discordant) | peak RSS MB |")
    md.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, entry in results.items():
        ours, ref, cmp = entry["ours"], entry.get("v120"), entry.get("compare")
        lines.append(f"== {name}: {WORKLOADS[name]['label']}")
        for side, res in (("ours", ours), ("1.2.0", ref)):
            if res is None:
                lines.append(f"   {side:6s} {entry.get('v120_note', 'skipped')}")
                continue
            if res["status"] != "ok":
                lines.append(f"   {side:6s} {res['status']} {res.get('error', '')}")
                continue
            t = res["times"]
            lines.append(
                f"   {side:6s} setup {_fmt(t['setup'])} s  fit {_fmt(t['fit'])} s  test {_fmt(t['test'])} s"
                f"  ({res['n_genes']} genes x {res['n_spots']} spots, torch {res['torch']}, "
                f"{res['threads']} thr, peak RSS {res['peak_rss_mb']:.0f} MB, load {res['load_before']:.2f})")
        if cmp:
            lines.append(
                f"   ratio 1.2.0/ours: setup {_fmt(cmp['setup_ratio'])}x  fit {_fmt(cmp['fit_ratio'])}x  "
                f"test {_fmt(cmp['test_ratio'])}x  total {_fmt(cmp['total_ratio'])}x")
            w = cmp["objective_worst"]
            lines.append(
                f"   objective (-model()): max rel diff {_fmt(cmp['objective_max_rel'])} "
                f"(median {_fmt(cmp['objective_median_rel'])}; ours lower on {cmp['objective_ours_lower']}, "
                f"higher on {cmp['objective_ours_higher']} of {cmp['objective_genes']} genes"
                + (f"; worst {w[0]}: ours {w[2]:.3f} vs 1.2.0 {w[3]:.3f})" if w else ")"))
            if cmp["n_isos_mismatch"]:
                lines.append(f"   WARNING isoform counts differ for {cmp['n_isos_mismatch']}")
            if cmp["p_tests"]:
                wp = cmp["p_worst"]
                lines.append(
                    f"   p-values: max |dlog10 p| {_fmt(cmp['p_max_log10_diff'])} (median "
                    f"{_fmt(cmp['p_median_log10_diff'], 3)}) over {cmp['p_compared']} of {cmp['p_tests']} tests "
                    f"with both p > 1e-10; {cmp['p_one_below_floor']} with only one p <= 1e-10; "
                    f"p < 0.05: ours {cmp['p_sig_ours']}, 1.2.0 {cmp['p_sig_v120']}, discordant "
                    f"{cmp['p_discordant_calls']}"
                    + (f"; worst {wp[0]}: ours {wp[2]:.3g} vs 1.2.0 {wp[3]:.3g}" if wp else ""))
        # markdown rows
        genes_spots = (f"{ours['n_genes']} x {ours['n_spots']}" if ours.get("status") == "ok" else "-")
        for side, res in (("ours", ours), ("1.2.0", ref)):
            if res is None or res.get("status") != "ok":
                status = entry.get("v120_note", "skipped") if res is None else res["status"]
                md.append(f"| {name} | {genes_spots} | {side} | {status} | | | | | | | |")
                continue
            t = res["times"]
            row = [name, genes_spots, side, _fmt(t["setup"]), _fmt(t["fit"]), _fmt(t["test"])]
            if side == "ours" or not cmp:
                row += ["", "", "", "", f"{res['peak_rss_mb']:.0f}"]
            else:
                calls = (f"{cmp['p_sig_ours']} / {cmp['p_sig_v120']}, {cmp['p_discordant_calls']}"
                         if cmp["p_tests"] else "-")
                row += [f"**{_fmt(cmp['fit_ratio'])}x**", _fmt(cmp["objective_max_rel"]),
                        _fmt(cmp["p_max_log10_diff"], 3) if cmp["p_tests"] else "-", calls,
                        f"{res['peak_rss_mb']:.0f}"]
            md.append("| " + " | ".join(row) + " |")
    header = (f"{meta['date']}, `{meta['command']}`; {meta['machine']}; threads {meta['threads']} "
              f"(torch.set_num_threads + OMP/MKL/OPENBLAS_NUM_THREADS), "
              f"{meta['repeats']} repeat(s) per side (times: minimum); ours: splisosm "
              f"{meta['ours']['splisosm']} ({meta['ours']['provenance']}), torch {meta['ours']['torch']}; "
              "reference: splisosm "
              f"{meta['v120']['splisosm'] if meta.get('v120') else '-'}, torch "
              f"{meta['v120']['torch'] if meta.get('v120') else '-'}; load average at start "
              f"{meta['load_start']}, at end {meta['load_end']}.")
    return "\n".join([header, *lines]), "\n".join([header, "", *md])


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kib = int(fh.readline().split()[1])
            mem = f", {kib / 1024 ** 2:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS, choices=list(WORKLOADS))
    ap.add_argument("--genes", nargs="*", default=[], metavar="WORKLOAD=N",
                    help="override a workload's gene count")
    ap.add_argument("--threads", type=int, default=1, help="threads per job (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--venv", type=Path,
                    default=Path(os.environ.get("SPLISOSM_BENCH_V120_VENV", DEFAULT_VENV)),
                    help="virtualenv for splisosm 1.2.0 (env SPLISOSM_BENCH_V120_VENV; default %(default)s)")
    ap.add_argument("--v120-torch", default="2.13.0",
                    help="torch version for the venvs this script creates (1.2.0 and --ours-ref)")
    ap.add_argument("--reinstall", action="store_true", help="recreate the venvs (1.2.0, and --ours-ref's)")
    ap.add_argument("--ours-python", default=sys.executable,
                    help="interpreter with our splisosm installed (default: this one)")
    ap.add_argument("--ours-ref", metavar="GIT_REF",
                    help="measure this commit of the repository instead, built into its own venv "
                         "under --cache-dir (e.g. HEAD); unaffected by uncommitted edits")
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(os.environ.get("SPLISOSM_BENCH_CACHE", DEFAULT_VENV.parent)),
                    help="where --ours-ref builds go (env SPLISOSM_BENCH_CACHE; default %(default)s)")
    ap.add_argument("--skip-v120", action="store_true", help="run ours only")
    ap.add_argument("--skip-ours", action="store_true", help="run 1.2.0 only")
    ap.add_argument("--v120-exact", action="store_true",
                    help="also try 1.2.0 on the exact-* workloads (killed after --v120-exact-timeout)")
    ap.add_argument("--v120-exact-timeout", type=float, default=300.0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each job this many times, alternating the order of the two sides; "
                         "times are the minimum over repeats (default 1)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per job, seconds")
    ap.add_argument("--workdir", type=Path, help="keep data and job outputs here (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--markdown", type=Path, help="write the markdown table here")
    args = ap.parse_args()

    gene_override = {}
    for item in args.genes:
        key, _, value = item.partition("=")
        if key not in WORKLOADS or not value.isdigit():
            ap.error(f"--genes expects WORKLOAD=N, got {item!r}")
        gene_override[key] = int(value)

    meta = {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python bench/bench_vs_v120.py " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    ours_python = args.ours_python
    if args.ours_ref:
        ours_python = str(ensure_ours_venv(args.ours_ref, args.cache_dir.expanduser().resolve(),
                                           args.v120_torch, args.reinstall))
    ours_info = _probe(ours_python, _clean_env(1, False))
    if ours_info is None:
        sys.exit(f"our splisosm does not import under {ours_python}; install it first "
                 "(README: pip install --no-build-isolation .) or use --ours-ref")
    if ours_info["splisosm"] == "1.2.0":
        sys.exit(f"{ours_python} imports splisosm 1.2.0, not ours")
    if args.ours_ref:
        ours_info["commit"] = _git("rev-parse", "--verify", f"{args.ours_ref}^{{commit}}")
    ours_info["python"] = ours_python
    ours_info["provenance"] = _ours_provenance(ours_info)
    meta["ours"] = ours_info
    print(f"[setup] ours: splisosm {ours_info['splisosm']} ({ours_info['provenance']}), torch "
          f"{ours_info['torch']}", file=sys.stderr)
    if "-dirty" in ours_info["provenance"]:
        print("[setup] WARNING: ours is a working tree with uncommitted changes; use --ours-ref "
              "to measure a commit", file=sys.stderr)
    need_v120 = not args.skip_v120 and any(WORKLOADS[w].get("v120", True) or args.v120_exact
                                           for w in args.workloads)
    if need_v120:
        meta["v120"] = ensure_v120_venv(args.venv, args.v120_torch, args.reinstall)
        print(f"[setup] 1.2.0: {meta['v120']['python']}, torch {meta['v120']['torch']}",
              file=sys.stderr)
        if meta["v120"]["torch"].split("+")[0] != ours_info["torch"].split("+")[0]:
            print("[setup] WARNING: torch versions differ between the two sides", file=sys.stderr)

    tmp = None
    if args.workdir:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="splisosm-vs-v120-")
        workdir = Path(tmp.name)

    results: dict = {}
    try:
        for name in args.workloads:
            spec = WORKLOADS[name]
            n_genes = gene_override.get(name, spec["genes"])
            print(f"[data] {name}: simulating {n_genes} genes on {spec['data']}", file=sys.stderr)
            h5ad = simulate(ours_python, spec["data"], n_genes, args.seed, workdir)
            entry: dict = {"genes": n_genes}
            run_ref = need_v120 and (spec.get("v120", True) or args.v120_exact)
            sides = []
            if not args.skip_ours:
                sides.append(("ours", ours_python, False, args.timeout))
            if run_ref:
                sides.append(("v120", meta["v120"]["python"], True,
                              args.timeout if spec.get("v120", True) else args.v120_exact_timeout))
            runs: dict = {side[0]: [] for side in sides}
            for rep in range(args.repeats):
                # alternate the order so that a drift in machine load hits both sides alike
                for side, python, is_ref, timeout in (sides if rep % 2 == 0 else sides[::-1]):
                    if runs[side] and runs[side][0].get("status") != "ok":
                        continue  # failed or timed out once: do not retry
                    print(f"[run] {name}: {side} (repeat {rep + 1}/{args.repeats})", file=sys.stderr)
                    runs[side].append(run_job(python, h5ad, spec["job"], args.threads, is_ref,
                                              timeout, workdir, f"{name}_{side}_r{rep}"))
            for side, reps in runs.items():
                entry[side] = _merge_repeats(reps)
            if args.skip_ours:
                entry["ours"] = {"status": "skipped"}
            if run_ref:
                if entry["v120"].get("status") == "ok" and entry["v120"]["package"] != "1.2.0":
                    sys.exit(f"the reference job imported splisosm {entry['v120']['package']}")
            else:
                entry["v120"] = None
                entry["v120_note"] = ("skipped (--skip-v120)" if args.skip_v120 else
                                      "not run (1.2.0 would eigendecompose the dense kernel: "
                                      "eigsh for n - 2 pairs; see --v120-exact)")
            if entry["ours"].get("status") == "ok" and (entry["v120"] or {}).get("status") == "ok":
                entry["compare"] = compare(entry["ours"], entry["v120"])
            results[name] = entry
            text, _ = report({name: entry}, {**meta, "load_end": "-"})
            print("\n".join(text.splitlines()[1:]), file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()

    meta["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text, md = report(results, meta)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(md + "\n")


if __name__ == "__main__":
    main()
