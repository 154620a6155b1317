"""Saving and loading :class:`~splisosm.hyptest_glmm.SplisosmGLMM` without pickle.

A saved model is one zip archive holding

* ``meta.json`` — format name and version, configuration, gene/covariate metadata, training
  logs and test-result metadata;
* ``tensors.safetensors`` — every tensor (per-gene counts, design, kernel inputs, fitted
  parameters, test statistics, permutation cache);
* ``filtered.h5ad`` — the filtered AnnData.

None of these formats can execute code when read, unlike pickle-based ``torch.save`` files.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_NAME = "splisosm-glmm"
FORMAT_VERSION = 1
_META, _TENSORS, _ADATA = "meta.json", "tensors.safetensors", "filtered.h5ad"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise ValueError(
        f"cannot save a configuration value of type {type(value).__name__} ({value!r}); "
        "only JSON-compatible values (numbers, strings, booleans, lists, dicts) are supported"
    )


def _t(x: Any) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().cpu().contiguous().clone()


def save_model(model, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` (see the module docstring for the layout)."""
    from splisosm._spatial import APPROX_RANK_AUTO

    tensors: dict[str, torch.Tensor] = {}
    genes = model._genes
    if genes is not None:
        for g, c in enumerate(genes.counts):
            tensors[f"counts/{g}"] = _t(c)
    if model.design_mtx is not None:
        tensors["design"] = _t(model.design_mtx)
    kernel = model._kernel
    if kernel is not None:
        if kernel.eigvals is not None:
            tensors["kernel/eigvals"] = _t(kernel.eigvals)
            tensors["kernel/eigvecs"] = _t(kernel.eigvecs)
        if kernel.precision is not None:
            prec = sp.csr_matrix(kernel.precision)
            tensors["kernel/prec_data"] = _t(prec.data)
            tensors["kernel/prec_indices"] = _t(prec.indices.astype(np.int64))
            tensors["kernel/prec_indptr"] = _t(prec.indptr.astype(np.int64))
    states_meta: dict[str, list[dict[str, Any]]] = {}
    for key, states in model._fitted_states.items():
        rows = []
        for g, s in enumerate(states):
            for name, value in s.params.items():
                tensors[f"state/{key}/{g}/{name}"] = _t(value)
            rows.append({
                "params": list(s.params),
                "converged": s.converged,
                "best_loss": s.best_loss,
                "best_epoch": s.best_epoch,
                "fitting_time": s.fitting_time,
                "n_isos": s.n_isos,
            })
        states_meta[key] = rows
    results_meta: dict[str, dict[str, Any]] = {}
    for test, results in (("sv", model._sv_test_results), ("du", model._du_test_results)):
        if not results:
            continue
        meta = {}
        for name, value in results.items():
            if isinstance(value, (str, bool)):
                meta[name] = value
            else:
                tensors[f"{test}/{name}"] = _t(value)
                meta[name] = {"tensor": isinstance(value, torch.Tensor)}
        results_meta[test] = meta
    perm_key = None
    if model._perm_cache is not None:
        tensors["perm/stats"] = _t(model._perm_cache["stats"])
        perm_key = list(model._perm_cache["key"])
    approx = model.approx_rank
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_type": model.model_type,
        "model_configs": model.model_configs,
        "k_neighbors": model.k_neighbors,
        "rho": model.rho,
        "approx_rank": "auto" if approx is APPROX_RANK_AUTO else approx,
        "device": model.device,
        "setup_args": model._setup_args,
        "has_data": genes is not None,
        "genes": None if genes is None else {
            "names": genes.names,
            "keys": [str(k) for k in genes.keys],
            "n_isos": genes.n_isos,
            "var_index": [idx.tolist() for idx in genes.var_index],
        },
        "n_spots": model.n_spots,
        "covariate_names": model.covariate_names,
        "kernel": None if kernel is None else {"n": model.n_spots},
        "is_trained": model._is_trained,
        "fit_generation": model._fit_generation,
        "fit_info": model._fit_info,
        "states": states_meta,
        "results": results_meta,
        "perm_key": perm_key,
    }
    meta_bytes = json.dumps(meta, default=_json_default).encode()
    with tempfile.TemporaryDirectory() as tmp:
        h5 = os.path.join(tmp, _ADATA)
        if model._filtered_adata is not None:
            _write_h5ad(model._filtered_adata, h5)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(_META, meta_bytes)
            zf.writestr(_TENSORS, st_save(tensors))
            if model._filtered_adata is not None:
                zf.write(h5, _ADATA)


def _write_h5ad(adata, path: str) -> None:
    """Write ``adata``; entries of ``uns`` that h5ad cannot store are dropped with a warning."""
    try:
        adata.write_h5ad(path)
        return
    except (TypeError, ValueError) as err:
        reason = str(err).splitlines()[0]
    probe = adata[:0, :0].copy()
    dropped = []
    for key in list(adata.uns.keys()):
        probe.uns = {key: adata.uns[key]}
        try:
            probe.write_h5ad(path)
        except (TypeError, ValueError):
            dropped.append(key)
    copy = adata.copy()
    for key in dropped:
        del copy.uns[key]
    warnings.warn(
        f"filtered AnnData: uns entries {dropped} cannot be written to .h5ad ({reason}); "
        "they are not saved.",
        UserWarning,
        stacklevel=4,
    )
    copy.write_h5ad(path)


def _read_archive(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    import anndata

    not_ours = f"{os.fspath(path)!r} is not a model saved by SplisosmGLMM.save()"
    if not zipfile.is_zipfile(path):
        raise ValueError(not_ours)
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        if _META not in names or _TENSORS not in names:
            raise ValueError(not_ours)
        try:
            meta = json.loads(zf.read(_META))
        except json.JSONDecodeError:
            raise ValueError(not_ours) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ValueError(not_ours)
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(path)!r} uses model format version {version}; this splisosm reads "
                f"version {FORMAT_VERSION}"
            )
        tensors = st_load(zf.read(_TENSORS))
        adata = None
        if _ADATA in names:
            with tempfile.TemporaryDirectory() as tmp:
                zf.extract(_ADATA, tmp)
                adata = anndata.read_h5ad(os.path.join(tmp, _ADATA))
    return meta, tensors, adata


def load_model(path: str | os.PathLike, map_location: str | None = None):
    """Rebuild a :class:`~splisosm.hyptest_glmm.SplisosmGLMM` saved by :func:`save_model`."""
    from splisosm._dataset import GeneTable
    from splisosm._runner import GeneState, KernelPayload
    from splisosm._spatial import APPROX_RANK_AUTO
    from splisosm.hyptest_glmm import SplisosmGLMM

    meta, tensors, adata = _read_archive(path)
    device = meta["device"] if map_location is None else torch.device(map_location).type
    cfg = meta["model_configs"]
    model = SplisosmGLMM(
        model_type=meta["model_type"],
        k_neighbors=meta["k_neighbors"],
        rho=meta["rho"],
        approx_rank=APPROX_RANK_AUTO if meta["approx_rank"] == "auto" else meta["approx_rank"],
        device=device,
        **cfg,
    )
    model._filtered_adata = adata
    model._setup_args = meta["setup_args"]
    if meta["has_data"]:
        g_meta = meta["genes"]
        n_genes = len(g_meta["names"])
        model._genes = GeneTable(
            counts=[tensors[f"counts/{g}"] for g in range(n_genes)],
            names=g_meta["names"],
            keys=g_meta["keys"],
            n_isos=g_meta["n_isos"],
            var_index=[np.asarray(idx, dtype=np.int64) for idx in g_meta["var_index"]],
        )
        model.n_genes = n_genes
        model.n_spots = meta["n_spots"]
        model.n_isos_per_gene = list(g_meta["n_isos"])
        model.gene_names = list(g_meta["names"])
        model.covariate_names = meta["covariate_names"]
        design = tensors.get("design")
        model.design_mtx = None if design is None else design.to(device)
        model.n_factors = 0 if design is None else design.shape[1]
    if meta["kernel"] is not None:
        precision = None
        if "kernel/prec_data" in tensors:
            n = meta["kernel"]["n"]
            precision = sp.csr_matrix(
                (tensors["kernel/prec_data"].numpy(), tensors["kernel/prec_indices"].numpy(),
                 tensors["kernel/prec_indptr"].numpy()),
                shape=(n, n),
            )
        eigvals = tensors.get("kernel/eigvals")
        eigvecs = tensors.get("kernel/eigvecs")
        model._kernel = KernelPayload(
            eigvals=None if eigvals is None else eigvals.numpy(),
            eigvecs=None if eigvecs is None else eigvecs.numpy(),
            precision=precision,
        )
    model._fitted_states = {
        key: [
            GeneState(
                params={name: tensors[f"state/{key}/{g}/{name}"] for name in row["params"]},
                converged=bool(row["converged"]),
                best_loss=float(row["best_loss"]),
                best_epoch=int(row["best_epoch"]),
                fitting_time=float(row["fitting_time"]),
                n_isos=int(row["n_isos"]),
            )
            for g, row in enumerate(rows)
        ]
        for key, rows in meta["states"].items()
    }
    model._is_trained = bool(meta["is_trained"])
    model._fit_generation = int(meta["fit_generation"])
    model._fit_info = meta["fit_info"]
    for test, attr in (("sv", "_sv_test_results"), ("du", "_du_test_results")):
        if test not in meta["results"]:
            continue
        results = {}
        for name, spec in meta["results"][test].items():
            if isinstance(spec, dict):
                value = tensors[f"{test}/{name}"]
                results[name] = value if spec["tensor"] else value.numpy()
            else:
                results[name] = spec
        setattr(model, attr, results)
    if meta["perm_key"] is not None:
        key = meta["perm_key"]
        model._perm_cache = {"key": (key[0], key[1], key[2]), "stats": tensors["perm/stats"].numpy()}
    return model
