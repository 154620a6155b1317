"""Saving and loading :class:`~splisosm.hyptest_glmm.SplisosmGLMM` without pickle.

A saved model is one zip archive holding

* ``meta.json`` — format name and version, configuration, gene/covariate metadata, training
  logs and test-result metadata;
* ``tensors.safetensors`` — every tensor (per-gene counts, design, kernel inputs, fitted
  parameters, test statistics, permutation cache);
* ``filtered.h5ad`` — the filtered AnnData.

None of these formats can execute code when read, unlike pickle-based ``torch.save`` files.
Loading checks every part against the others before it builds the model, so a damaged or
modified file is refused with :class:`DamagedModelError` rather than loaded half-way.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from splisosm._docs import fill_doc
from splisosm.config import APPROX_RANK_AUTO, GLMMConfig, ModelType
from splisosm.data._setup import SetupRecord
from splisosm.glmm._fit import FitRecord
from splisosm.glmm._fitting import check_device
from splisosm.glmm._sv import PermutationCache
from splisosm.results import DUResult, SVResult

FORMAT_NAME = "splisosm-glmm"
FORMAT_VERSION = 1
_META, _TENSORS, _ADATA = "meta.json", "tensors.safetensors", "filtered.h5ad"


class DamagedModelError(ValueError):
    """A file written by ``save()`` that cannot be read back as it was written.

    Raised for an unreadable member (bad checksum, cut short, not in its format) and for
    members that disagree with each other; the message names the path and the part at fault.
    """


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


@dataclass(frozen=True, eq=False)
class SavedModel:
    """Everything a model file holds: the configuration and the records of each step."""

    config: GLMMConfig
    setup: SetupRecord | None = None
    fit: FitRecord | None = None
    sv: SVResult | None = None
    du: DUResult | None = None
    permutations: PermutationCache | None = None


def save_model(saved: SavedModel, path: str | os.PathLike) -> None:
    """Write ``saved`` to ``path`` (see the module docstring for the layout)."""
    config, setup = saved.config, saved.setup
    tensors: dict[str, Any] = {}
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_type": config.model_type,
        "model_configs": config.model_configs(),
        "k_neighbors": config.k_neighbors,
        "rho": config.rho,
        "approx_rank": config.to_dict()["approx_rank"],
        "device": config.device,
        "has_data": setup is not None,
        "setup_args": {},
        "genes": None, "n_spots": None, "covariate_names": None, "kernel": None,
        "is_trained": saved.fit is not None,
        "fit_generation": 0, "fit_info": {}, "states": {},
        "results": {},
        "perm_key": None if saved.permutations is None else list(saved.permutations.key),
    }
    for record in (setup, saved.fit):
        if record is not None:
            part, part_tensors = record.to_dict()
            meta.update(part)
            tensors.update(part_tensors)
    for test, result in (("sv", saved.sv), ("du", saved.du)):
        if result is None:
            continue
        meta["results"][test] = {}
        for name, value in result.to_dict().items():
            if isinstance(value, (str, bool)):
                meta["results"][test][name] = value
            else:
                tensors[f"{test}/{name}"] = value
                meta["results"][test][name] = {"tensor": False}
    if saved.permutations is not None:
        tensors["perm/stats"] = saved.permutations.stats
    meta_bytes = json.dumps(meta, default=_json_default).encode()
    with tempfile.TemporaryDirectory() as tmp:
        h5 = os.path.join(tmp, _ADATA)
        if setup is not None:
            _write_h5ad(setup.filtered_adata, h5)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(_META, meta_bytes)
            zf.writestr(_TENSORS, st_save({name: _t(value) for name, value in tensors.items()}))
            if setup is not None:
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


def _shown_path(path: str | os.PathLike) -> str:
    return repr(os.fspath(path))


def _damaged(path: str | os.PathLike, what: str) -> DamagedModelError:
    return DamagedModelError(f"{_shown_path(path)} is damaged: {what}")


def _inconsistent(path: str | os.PathLike, what: str) -> DamagedModelError:
    return _damaged(path, f"the saved model is inconsistent ({what})")


def _read_h5ad_bytes(data: bytes):
    import anndata

    with tempfile.TemporaryDirectory() as tmp:
        h5 = os.path.join(tmp, _ADATA)
        with open(h5, "wb") as fh:
            fh.write(data)
        return anndata.read_h5ad(h5)


def _member(zf: zipfile.ZipFile, name: str, path: str | os.PathLike, decode) -> Any:
    """Read the archive member ``name`` and decode it, any failure reported as damage.

    The decoders (JSON, safetensors, h5py through anndata) raise many unrelated exception
    classes on malformed bytes; none of them executes code from the data.
    """
    try:
        return decode(zf.read(name))
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _damaged(path, f"its member {name!r} cannot be read ({reason})") from err


def _check_keys(found: dict, expected, where: str, path: str | os.PathLike) -> None:
    """Refuse a saved mapping whose keys differ from what ``save()`` writes."""
    unknown = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    parts = [f"{label} keys {keys}" for label, keys in (("unknown", unknown), ("missing", missing)) if keys]
    if parts:
        raise _inconsistent(path, f"{where} has {' and '.join(parts)}")


_NONE = type(None)
#: Top-level entries of meta.json and their JSON types.
_META_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,), "format_version": (int,), "model_type": (str,), "model_configs": (dict,),
    "k_neighbors": (int,), "rho": (int, float), "approx_rank": (str, int, _NONE), "device": (str,),
    "setup_args": (dict,), "has_data": (bool,), "genes": (dict, _NONE), "n_spots": (int, _NONE),
    "covariate_names": (list, _NONE), "kernel": (dict, _NONE), "is_trained": (bool,),
    "fit_generation": (int,), "fit_info": (dict,), "states": (dict,), "results": (dict,),
    "perm_key": (list, _NONE),
}
_GENE_FIELDS = ("names", "keys", "n_isos", "var_index")
_STATE_FIELDS = ("params", "converged", "best_loss", "best_epoch", "fitting_time", "n_isos")


def _check_meta_fields(meta: dict[str, Any], path: str | os.PathLike) -> None:
    _check_keys(meta, _META_FIELDS, _META, path)
    for key, types in _META_FIELDS.items():
        if not isinstance(meta[key], types):
            names = " or ".join("null" if t is _NONE else t.__name__ for t in types)
            raise _inconsistent(path, f"{_META} entry {key!r} is {meta[key]!r}, expected {names}")


def _read_archive(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    shown = _shown_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{shown} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{shown} is a directory, not a file written by SplisosmGLMM.save()")
    not_ours = f"{shown} is not a model saved by SplisosmGLMM.save()"
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        # A file that starts like a zip archive but has no readable directory was cut short
        # or overwritten, which deserves a different answer than a foreign file.
        with open(path, "rb") as fh:
            if fh.read(4) == b"PK\x03\x04":
                raise _damaged(path, "its zip directory is missing or unreadable; was it truncated?") from None
        raise ValueError(not_ours) from None
    with zf:
        names = set(zf.namelist())
        if _META not in names:
            raise ValueError(not_ours)
        meta = _member(zf, _META, path, json.loads)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ValueError(not_ours)
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{shown} uses model format version {version}; this splisosm reads "
                f"version {FORMAT_VERSION}"
            )
        _check_meta_fields(meta, path)
        expected = {_META, _TENSORS} | ({_ADATA} if meta["has_data"] else set())
        if names != expected:
            missing, extra = sorted(expected - names), sorted(names - expected)
            what = f"member {missing[0]!r} is missing" if missing else f"unexpected member {extra[0]!r}"
            if _ADATA in missing + extra:
                what += f" although 'has_data' is {str(meta['has_data']).lower()}"
            raise _inconsistent(path, what)
        tensors = _member(zf, _TENSORS, path, st_load)
        adata = _member(zf, _ADATA, path, _read_h5ad_bytes) if meta["has_data"] else None
    return meta, tensors, adata


def _expected_tensors(meta: dict[str, Any], present: set[str]) -> set[str]:
    """Names of the tensors ``save()`` writes for ``meta``.

    The kernel is stored as eigenpairs, a sparse precision or both; each form is expected
    whole once any of its parts is present, and the eigenpairs when none is.
    """
    names: set[str] = set()
    if meta["has_data"]:
        names |= {f"counts/{g}" for g in range(len(meta["genes"]["names"]))}
        if meta["covariate_names"] is not None:
            names.add("design")
    if meta["kernel"] is not None:
        forms = [("kernel/eigvals", "kernel/eigvecs"),
                 ("kernel/prec_data", "kernel/prec_indices", "kernel/prec_indptr")]
        used = [form for form in forms if present.intersection(form)] or forms[:1]
        names.update(*used)
    for key, rows in meta["states"].items():
        names |= {f"state/{key}/{g}/{name}" for g, row in enumerate(rows) for name in row["params"]}
    for test, specs in meta["results"].items():
        names |= {f"{test}/{name}" for name, spec in specs.items() if isinstance(spec, dict)}
    if meta["perm_key"] is not None:
        names.add("perm/stats")
    return names


def _check_consistent(meta: dict[str, Any], tensors: dict[str, torch.Tensor], adata: Any,
                      path: str | os.PathLike) -> None:
    """Refuse a saved model whose parts disagree with each other (tampered or corrupt).

    The metadata is checked on its own first, then the set of tensors it implies, then their
    shapes, so that the message names the first part that went wrong rather than a consequence.
    """
    def fail(what: str) -> None:
        raise _inconsistent(path, what)

    def shape(name: str, expected: tuple[int, ...], meaning: str) -> None:
        got = tuple(tensors[name].shape)
        if got != expected:
            fail(f"tensor {name!r} has shape {got}, expected {expected} ({meaning})")

    _check_keys(meta["model_configs"], GLMMConfig().model_configs(), "the configuration 'model_configs'",
                path)
    has_data, genes, n = meta["has_data"], meta["genes"], meta["n_spots"]
    if has_data != (genes is not None) or has_data != (n is not None):
        fail(f"'has_data' is {has_data} but 'genes' is {'null' if genes is None else 'set'} "
             f"and 'n_spots' is {n}")
    n_isos: list[int] = []
    if has_data:
        _check_keys(genes, _GENE_FIELDS, "the gene table 'genes'", path)
        lengths = {field: len(genes[field]) for field in _GENE_FIELDS}
        if len(set(lengths.values())) != 1:
            fail(f"the gene table lists different numbers of genes: {lengths}")
        n_isos = genes["n_isos"]
        for g, m in enumerate(n_isos):
            if len(genes["var_index"][g]) != m:
                fail(f"gene {g} has {m} isoforms but {len(genes['var_index'][g])} var_index entries")
    if (meta["kernel"] is not None) != (has_data and meta["model_type"] != ModelType.GLM):
        fail(f"a {meta['model_type']!r} model {'with' if has_data else 'without'} data has the kernel "
             f"entry {meta['kernel']}")
    if meta["kernel"] is not None and meta["kernel"] != {"n": n}:
        fail(f"the kernel entry {meta['kernel']} does not match {n} spots")
    for key, rows in meta["states"].items():
        if key not in ModelType.values():
            fail(f"fitted states of unknown model type {key!r}")
        if len(rows) != len(n_isos):
            fail(f"{len(rows)} fitted {key!r} genes for {len(n_isos)} genes")
        for g, row in enumerate(rows):
            _check_keys(row, _STATE_FIELDS, f"the fitted state {key!r} of gene {g}", path)
            if row["n_isos"] != n_isos[g]:
                fail(f"the fitted {key!r} state of gene {g} has {row['n_isos']} isoforms but the "
                     f"gene has {n_isos[g]}")
    if set(meta["results"]) - {"sv", "du"}:
        fail(f"results of unknown tests {sorted(set(meta['results']) - {'sv', 'du'})}")
    if meta["perm_key"] is not None and len(meta["perm_key"]) != 3:
        fail(f"'perm_key' is {meta['perm_key']}, expected [fit generation, permutations, seed]")

    present = set(tensors)
    expected = _expected_tensors(meta, present)
    if expected - present:
        fail(f"tensor {sorted(expected - present)[0]!r} is missing")
    if present - expected:
        fail(f"unexpected tensor {sorted(present - expected)[0]!r}")

    for g, m in enumerate(n_isos):
        shape(f"counts/{g}", (n, m), f"spots x isoforms of gene {g}")
    if has_data and tuple(adata.shape) != (n, sum(n_isos)):
        fail(f"{_ADATA} has shape {tuple(adata.shape)}, expected {(n, sum(n_isos))} "
             "(spots x isoforms of all genes)")
    if "design" in tensors:
        shape("design", (n, len(meta["covariate_names"])), "spots x covariates")
    if "kernel/eigvecs" in tensors:
        rank = tensors["kernel/eigvals"].shape[0]
        shape("kernel/eigvals", (rank,), "kernel eigenvalues")
        shape("kernel/eigvecs", (n, rank), f"spots x the {rank} entries of 'kernel/eigvals'")
    if "kernel/prec_indptr" in tensors:
        try:
            parts = (tensors[f"kernel/prec_{part}"].numpy() for part in ("data", "indices", "indptr"))
            sp.csr_matrix(tuple(parts), shape=(n, n)).check_format(full_check=True)
        except ValueError as err:
            fail(f"the kernel precision is not a valid {n} x {n} sparse matrix: {err}")
    for key, rows in meta["states"].items():
        for g, row in enumerate(rows):
            for name in row["params"]:
                if tensors[f"state/{key}/{g}/{name}"].shape[:1] != (1,):
                    fail(f"tensor 'state/{key}/{g}/{name}' lacks its leading gene axis of size 1")
    for test, specs in meta["results"].items():
        for name, spec in specs.items():
            if isinstance(spec, dict) and tensors[f"{test}/{name}"].shape[:1] != (len(n_isos),):
                fail(f"tensor '{test}/{name}' has shape {tuple(tensors[f'{test}/{name}'].shape)}, "
                     f"expected one row per gene ({len(n_isos)})")
    if meta["perm_key"] is not None:
        shape("perm/stats", (meta["perm_key"][1], len(n_isos)), "permutations x genes")


def _saved_device(saved: str, path: str | os.PathLike) -> str:
    """The saved device, refused with a hint to ``map_location`` where it is not usable here."""

    try:
        check_device(saved)
    except ValueError as err:
        raise ValueError(
            f"cannot load {_shown_path(path)} on the device it was saved for: {err} "
            "Pass map_location='cpu' to load it on the CPU."
        ) from None
    return saved


def _device_type(location: Any) -> Any:
    """``'cuda:0'`` or ``torch.device('cuda', 0)`` as ``'cuda'`` (as torch.load accepts them).

    A model lives on one device type; an index other than 0 cannot be honoured and is refused.
    """
    if isinstance(location, (str, torch.device)):
        try:
            dev = torch.device(location)
        except RuntimeError:
            return location  # not a device string: check_device names it
        if dev.index not in (None, 0):
            raise ValueError(f"map_location={location!r}: only device index 0 is supported")
        return dev.type
    return location


#: The arguments and errors of loading a model file (shown by ``SplisosmGLMM.load`` too).
LOAD_DOC = """\
Parameters
----------
path
    File written by ``SplisosmGLMM.save``.
map_location
    ``'cpu'``, ``'cuda'`` or ``'mps'`` (also ``'cuda:0'`` or a ``torch.device``); default:
    the saved device.

Raises
------
FileNotFoundError, IsADirectoryError
    ``path`` does not exist or is a directory.
splisosm.io.DamagedModelError
    (a ``ValueError``) A member that cannot be read or parts that disagree with each other;
    the message names the part at fault.
ValueError
    Not a model saved by ``SplisosmGLMM.save``, another format version, or a device that is
    not available here. Loading never runs code stored in the file.
"""


@fill_doc(load_parameters=LOAD_DOC)
def load_model(path: str | os.PathLike, map_location: str | None = None) -> SavedModel:
    """The :class:`SavedModel` in the file at ``path``, checked whole before it is returned.

    {load_parameters}
    """

    if map_location is not None:
        map_location = _device_type(map_location)
        check_device(map_location, "map_location")
    meta, tensors, adata = _read_archive(path)
    device = map_location or _saved_device(meta["device"], path)
    try:
        _check_consistent(meta, tensors, adata, path)
        return _rebuild(meta, tensors, adata, device)
    except DamagedModelError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        # Nested JSON values of the wrong type, or configuration values the constructor
        # refuses, can only come from a modified file.
        reason = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
        raise _inconsistent(path, reason) from err


def _rebuild(meta: dict[str, Any], tensors: dict[str, torch.Tensor], adata: Any, device: str) -> SavedModel:
    approx = meta["approx_rank"]
    config = GLMMConfig(model_type=meta["model_type"], k_neighbors=meta["k_neighbors"], rho=meta["rho"],
                        approx_rank=APPROX_RANK_AUTO if approx == "auto" else approx, device=device,
                        **meta["model_configs"])
    setup = SetupRecord.from_dict(meta, tensors, adata, device) if meta["has_data"] else None
    fit = FitRecord.from_dict(meta, tensors) if meta["is_trained"] else None
    stored = {
        test: {name: tensors[f"{test}/{name}"].numpy() if isinstance(spec, dict) else spec
               for name, spec in specs.items()}
        for test, specs in meta["results"].items()
    }
    key = meta["perm_key"]
    return SavedModel(
        config=config, setup=setup, fit=fit,
        sv=SVResult.from_dict(stored["sv"], setup.genes.names) if "sv" in stored else None,
        du=DUResult.from_dict(stored["du"], setup.genes.names, setup.covariate_labels())
        if "du" in stored else None,
        permutations=None if key is None else PermutationCache(
            key=(key[0], key[1], key[2]), stats=tensors["perm/stats"].numpy()),
    )
