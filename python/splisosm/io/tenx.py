"""Reading 10x Genomics Visium probe-level output (Space Ranger) into an AnnData.

Probe-based Visium assays (FFPE, CytAssist) count UMIs per probe; a gene is usually covered
by several probes, which can target different exons or splice junctions. Space Ranger writes
these per-probe counts to ``outs/raw_probe_bc_matrix.h5``. :func:`read_visium_probes` turns
that file and the spot positions next to it into the AnnData layout
:meth:`splisosm.hyptest_glmm.SplisosmGLMM.setup_data` expects, with one probe per "isoform".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["read_visium_probes"]

#: The columns of ``tissue_positions.csv`` / ``tissue_positions_list.csv``, in file order.
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
#: Positions files looked for in ``outs/spatial``, in order of preference (Space Ranger >= 2.0 first).
POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
_MATRIX_DATASETS = ("barcodes", "data", "indices", "indptr", "shape")
_N_SHOWN = 5  # how many offending names an error message lists


def read_visium_probes(
    path: str | os.PathLike[str],
    *,
    counts_file: str | os.PathLike[str] = "raw_probe_bc_matrix.h5",
    tissue_only: bool = True,
    positions_file: str | os.PathLike[str] | None = None,
    feature_type: str | None = "Gene Expression",
    filtered_probes_only: bool = True,
) -> ad.AnnData:
    """Read a Space Ranger probe-level count matrix and spot positions into an AnnData.

    Parameters
    ----------
    path
        A Space Ranger ``outs/`` folder.
    counts_file
        The probe-barcode matrix, relative to ``path`` (or absolute).
    tissue_only
        Keep only the spots whose ``in_tissue`` flag is 1 in the positions file; otherwise
        keep every barcode of the matrix.
    positions_file
        The spot positions, relative to ``path`` (or absolute). By default
        ``spatial/tissue_positions.csv`` (Space Ranger >= 2.0) or, failing that,
        ``spatial/tissue_positions_list.csv`` (older releases).
    feature_type
        Keep only features whose ``features/feature_type`` is this value (``None``: keep all).
        The default drops e.g. antibody-capture features of CytAssist protein runs. Ignored
        when the file has no ``feature_type`` field.
    filtered_probes_only
        When the file has a ``features/filtered_probes`` field, keep only the probes it
        marks true (those Space Ranger keeps in its filtered matrices; it drops probes
        predicted to be off-target). Ignored when the field is absent.

    Returns
    -------
    anndata.AnnData
        ``(n_spots, n_probes)``, in the matrix's barcode and probe order:

        * ``obs``: indexed by barcode; columns ``in_tissue`` (bool), ``array_row``,
          ``array_col`` from the positions file.
        * ``var``: indexed by probe id; columns ``gene_symbol`` (the gene name, so each
          probe is one "isoform" of its gene, the ``group_iso_by`` default of
          ``setup_data``), ``probe_id``, and, where the file has them, ``gene_id``,
          ``feature_type``, ``genome``, ``probe_region`` and ``filtered_probes``.
        * ``layers['counts']``: ``scipy.sparse.csr_matrix`` of integer UMI counts
          (``int32``; ``int64`` if a count does not fit), spots x probes.
        * ``X``: a copy of the counts (so normalising ``X`` in place leaves the counts alone).
        * ``obsm['spatial']``: ``(n_spots, 2)`` float64 full-resolution image pixel
          coordinates as **(x, y) = (pxl_col_in_fullres, pxl_row_in_fullres)**, the same
          order as scanpy/squidpy use.

    Raises
    ------
    FileNotFoundError
        ``path``, the counts file or the positions file does not exist.
    NotADirectoryError
        ``path`` is a file rather than an ``outs/`` folder.
    ValueError
        The counts file is not HDF5, not a 10x feature-barcode matrix, inconsistent, holds
        negative or non-integer counts, is gene-level rather than probe-level, or has
        barcodes missing from the positions file; the positions file is malformed; nothing
        is left after the tissue, feature-type or probe filters.

    Notes
    -----
    What this reader relies on, from the 10x Genomics "HDF5 Feature-Barcode Matrix Format"
    and "Spatial outputs" documentation:

    * The counts file holds one HDF5 group ``matrix`` with datasets ``data`` (non-zero UMI
      counts), ``indices`` (zero-based feature index of each entry), ``indptr`` (start of
      each barcode's entries) and ``shape`` = ``(n_features, n_barcodes)``: a compressed
      sparse *column* matrix with one column per barcode. ``barcodes`` holds the spot
      barcodes (e.g. ``AAACAAGTATCTCCCA-1``). The sub-group ``features`` holds ``id`` and
      ``name`` (required here), and ``feature_type``, ``genome`` (used when present).
    * In the probe-level file ``raw_probe_bc_matrix.h5`` each feature is a probe: ``id`` is
      the probe id (10x probe sets write ``<gene id>|<gene name>|<hash>``) and ``name`` the
      gene name; ``gene_id``, ``probe_region`` and ``filtered_probes`` may also be present.
      A file without ``gene_id`` whose ids contain no ``|`` and whose gene names are all
      distinct (one feature per gene) is taken to be a gene-level matrix
      (e.g. ``raw_feature_bc_matrix.h5``) and refused: it has no probes to compare.
    * ``spatial/tissue_positions.csv`` has a header line
      ``barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres``;
      ``spatial/tissue_positions_list.csv`` has the same six columns and no header. The file
      lists every spot of the capture area; ``in_tissue`` is 1 for spots under tissue.

    Every matrix barcode must be in the positions file. Positions of spots absent from the
    matrix (e.g. spots with no reads in a raw matrix) are not added.

    Examples
    --------
    >>> adata = read_visium_probes("sample/outs")  # doctest: +SKIP
    >>> model = SplisosmGLMM(model_type="glmm-full")  # doctest: +SKIP
    >>> model.setup_data(adata, group_gene_by_n_iso=True)  # doctest: +SKIP
    """
    outs = Path(path)
    if not outs.exists():
        raise FileNotFoundError(f"Space Ranger output folder {str(outs)!r} does not exist")
    if not outs.is_dir():
        raise NotADirectoryError(
            f"{str(outs)!r} is a file, not a Space Ranger 'outs/' folder; pass the folder that holds "
            f"{str(counts_file)!r} and 'spatial/'")

    counts_path = outs / counts_file
    if not counts_path.is_file():
        present = sorted(p.name for p in outs.glob("*.h5"))
        hint = f" (.h5 files there: {', '.join(present)})" if present else ""
        raise FileNotFoundError(f"counts file {str(counts_path)!r} does not exist{hint}")
    matrix, barcodes, features = _read_matrix(counts_path)

    positions_path = _find_positions(outs, positions_file)
    positions = _read_positions(positions_path)

    # spots: every matrix barcode must have a position
    missing = ~pd.Index(barcodes).isin(positions.index)
    if missing.any():
        raise ValueError(
            f"{int(missing.sum())} of the {len(barcodes)} barcodes in {str(counts_path)!r} are not in "
            f"{str(positions_path)!r} (e.g. {_show(barcodes[missing])}); are both files from the same "
            "Space Ranger run?")
    spot_pos = positions.loc[barcodes]
    keep_spots = spot_pos["in_tissue"].to_numpy() if tissue_only else np.ones(len(barcodes), dtype=bool)
    if not keep_spots.any():
        raise ValueError(
            f"no barcode of {str(counts_path)!r} is marked in_tissue=1 in {str(positions_path)!r}; "
            "pass tissue_only=False to keep all spots")

    # probes
    keep_probes = np.ones(len(features), dtype=bool)
    if feature_type is not None and "feature_type" in features:
        keep_probes &= features["feature_type"].to_numpy() == feature_type
        if not keep_probes.any():
            kinds = sorted(set(features["feature_type"]))
            raise ValueError(
                f"{str(counts_path)!r} has no features of type {feature_type!r} (types present: {kinds}); "
                "pass feature_type=None to keep all features")
    if filtered_probes_only and "filtered_probes" in features:
        keep_probes &= features["filtered_probes"].to_numpy()
        if not keep_probes.any():
            raise ValueError(
                f"no probe of {str(counts_path)!r} is marked true in 'matrix/features/filtered_probes'; "
                "pass filtered_probes_only=False to keep them all")
    _check_probe_level(features[keep_probes], counts_path)

    spot_idx = np.flatnonzero(keep_spots)
    probe_idx = np.flatnonzero(keep_probes)
    # column selection is cheap on CSC; the transpose of a CSC matrix is CSR
    counts = matrix[:, spot_idx][probe_idx, :].T.tocsr()
    counts.sort_indices()

    obs_pos = spot_pos.iloc[spot_idx]
    obs = pd.DataFrame(
        {"in_tissue": obs_pos["in_tissue"].to_numpy(),
         "array_row": obs_pos["array_row"].to_numpy(),
         "array_col": obs_pos["array_col"].to_numpy()},
        index=pd.Index(barcodes[spot_idx], name=None))
    var = features.iloc[probe_idx].copy()
    var.index = pd.Index(var["probe_id"].to_numpy(), name=None)
    coords = obs_pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)

    return ad.AnnData(X=counts.copy(), obs=obs, var=var, layers={"counts": counts},
                      obsm={"spatial": coords})


# ---------------------------------------------------------------------------------- counts file
def _read_matrix(file: Path) -> tuple[sp.csc_matrix, np.ndarray, pd.DataFrame]:
    """The (features x barcodes) CSC counts, the barcodes and the feature table of a 10x h5."""
    where = repr(str(file))
    try:
        h5 = h5py.File(file, "r")
    except OSError as err:
        raise ValueError(f"{where} is not a readable HDF5 file ({err})") from err
    with h5:
        group = h5.get("matrix")
        if not isinstance(group, h5py.Group):
            raise ValueError(
                f"{where} is not a 10x feature-barcode matrix: it has no 'matrix' group "
                f"(top level holds: {sorted(h5.keys())})")
        absent = [name for name in _MATRIX_DATASETS if not isinstance(group.get(name), h5py.Dataset)]
        if absent:
            raise ValueError(f"{where} is not a 10x feature-barcode matrix: 'matrix' lacks {absent}")
        feats = group.get("features")
        if not isinstance(feats, h5py.Group):
            raise ValueError(f"{where} is not a 10x feature-barcode matrix: it has no 'matrix/features' group")
        if not isinstance(feats.get("id"), h5py.Dataset):
            raise ValueError(
                f"{where} has no probe ids ('matrix/features/id'); a probe-level matrix "
                "(raw_probe_bc_matrix.h5) is required")
        if not isinstance(feats.get("name"), h5py.Dataset):
            raise ValueError(f"{where} has no gene names ('matrix/features/name')")

        shape = np.asarray(group["shape"][()]).ravel()
        data = np.asarray(group["data"][()])
        indices = np.asarray(group["indices"][()])
        indptr = np.asarray(group["indptr"][()])
        barcodes = _strings(group["barcodes"])
        table: dict[str, Any] = {"gene_symbol": _strings(feats["name"]), "probe_id": _strings(feats["id"])}
        for name in ("gene_id", "feature_type", "genome", "probe_region"):
            if isinstance(feats.get(name), h5py.Dataset):
                table[name] = _strings(feats[name])
        if isinstance(feats.get("filtered_probes"), h5py.Dataset):
            table["filtered_probes"] = _booleans(
                feats["filtered_probes"], f"{where}: 'matrix/features/filtered_probes'")

    if shape.size != 2 or not np.issubdtype(shape.dtype, np.integer) or (shape < 0).any():
        raise ValueError(f"{where}: 'matrix/shape' must be two non-negative integers, got {shape.tolist()}")
    n_features, n_barcodes = (int(s) for s in shape)
    for name, values in table.items():
        if len(values) != n_features:
            raise ValueError(
                f"{where}: 'matrix/features/{_H5_NAME.get(name, name)}' has {len(values)} entries but "
                f"'matrix/shape' says {n_features} features")
    if len(barcodes) != n_barcodes:
        raise ValueError(
            f"{where}: 'matrix/barcodes' has {len(barcodes)} entries but 'matrix/shape' says {n_barcodes} barcodes")
    if len(set(barcodes)) != n_barcodes:
        raise ValueError(f"{where}: 'matrix/barcodes' has duplicates (e.g. {_show(_duplicates(barcodes))})")
    probe_ids = table["probe_id"]
    if len(set(probe_ids)) != n_features:
        raise ValueError(f"{where}: 'matrix/features/id' has duplicate ids (e.g. {_show(_duplicates(probe_ids))})")

    data = _integer_counts(data, where)
    for name, values in (("indices", indices), ("indptr", indptr)):
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{where}: 'matrix/{name}' must be a 1-D integer array, got dtype {values.dtype}")
    if data.ndim != 1 or len(indices) != len(data):
        raise ValueError(
            f"{where}: 'matrix/data' and 'matrix/indices' differ in length ({len(data)} vs {len(indices)})")
    if len(indptr) != n_barcodes + 1 or indptr[0] != 0 or indptr[-1] != len(data) or (np.diff(indptr) < 0).any():
        raise ValueError(
            f"{where}: 'matrix/indptr' is not a valid column pointer for {n_barcodes} barcodes and "
            f"{len(data)} entries (the matrix is stored column by column, one column per barcode)")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_features):
        raise ValueError(f"{where}: 'matrix/indices' has feature indices outside [0, {n_features})")

    matrix = sp.csc_matrix(
        (data, indices.astype(np.int64, copy=False), indptr.astype(np.int64, copy=False)),
        shape=(n_features, n_barcodes))
    matrix.sum_duplicates()
    return matrix, barcodes, pd.DataFrame(table)


_H5_NAME = {"gene_symbol": "name", "probe_id": "id"}


def _strings(dataset: h5py.Dataset) -> np.ndarray:
    """A 1-D dataset of fixed- or variable-length strings (bytes or str) as an array of str."""
    raw = np.asarray(dataset[()]).ravel()
    if raw.dtype.kind == "S":
        return np.char.decode(raw, "utf-8").astype(object)
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in raw], dtype=object)


def _booleans(dataset: h5py.Dataset, what: str) -> np.ndarray:
    """Flags stored as booleans, integers 0/1 or the strings true/false."""
    raw = np.asarray(dataset[()]).ravel()
    if raw.dtype.kind == "b":
        return raw.astype(bool)
    if raw.dtype.kind in "iu":
        if not np.isin(raw, (0, 1)).all():
            raise ValueError(f"{what} must hold 0/1 flags")
        return raw.astype(bool)
    text = np.char.lower(_strings(dataset).astype(str))
    if not np.isin(text, ("true", "false", "1", "0")).all():
        raise ValueError(f"{what} must hold true/false flags, got e.g. {_show(text)}")
    return np.isin(text, ("true", "1"))


def _integer_counts(data: np.ndarray, where: str) -> np.ndarray:
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise ValueError(f"{where}: 'matrix/data' holds non-integer counts; raw UMI counts are required")
    elif not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"{where}: 'matrix/data' must hold numbers, got dtype {data.dtype}")
    if len(data) and data.min() < 0:
        raise ValueError(f"{where}: 'matrix/data' holds negative counts")
    fits = not len(data) or data.max() <= np.iinfo(np.int32).max
    return data.astype(np.int32 if fits else np.int64)


def _check_probe_level(features: pd.DataFrame, counts_path: Path) -> None:
    """Refuse a gene-level matrix: no gene_id field, no 10x probe ids, one feature per gene."""
    if "gene_id" in features:
        return
    ids = features["probe_id"].astype(str)
    if ids.str.contains("|", regex=False).any():
        return
    if features["gene_symbol"].is_unique:
        raise ValueError(
            f"{str(counts_path)!r} looks like a gene-level matrix, not a probe-level one: it has no "
            "'matrix/features/gene_id', its feature ids are not 10x probe ids (<gene id>|<gene name>|<hash>) "
            "and every gene name appears once. Isoform analysis needs per-probe counts: read "
            "'raw_probe_bc_matrix.h5' (written by Space Ranger for probe-based assays)")


# ---------------------------------------------------------------------------------- positions
def _find_positions(outs: Path, positions_file: str | os.PathLike[str] | None) -> Path:
    if positions_file is not None:
        found = outs / positions_file
        if not found.is_file():
            raise FileNotFoundError(f"positions file {str(found)!r} does not exist")
        return found
    spatial = outs / "spatial"
    for name in POSITION_FILES:
        if (spatial / name).is_file():
            return spatial / name
    raise FileNotFoundError(
        f"no spot positions in {str(spatial)!r}: expected {' or '.join(POSITION_FILES)}")


def _read_positions(file: Path) -> pd.DataFrame:
    """The positions table indexed by barcode, with ``in_tissue`` as bool."""
    where = repr(str(file))
    with open(file, newline="", encoding="utf-8") as handle:
        first = handle.readline().strip().lstrip("\ufeff")
    if not first:
        raise ValueError(f"positions file {where} is empty")
    has_header = first.split(",")[0].strip().strip('"') == "barcode"
    try:
        table = pd.read_csv(file, header=0 if has_header else None, dtype=str, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"positions file {where} is not a readable CSV table ({err})") from err

    if has_header:
        table.columns = [str(c).strip() for c in table.columns]
        absent = [c for c in POSITION_COLUMNS if c not in table.columns]
        if absent:
            raise ValueError(f"positions file {where} lacks the column(s) {absent}; expected {list(POSITION_COLUMNS)}")
        table = table[list(POSITION_COLUMNS)]
    else:
        if table.shape[1] != len(POSITION_COLUMNS):
            raise ValueError(
                f"positions file {where} has {table.shape[1]} columns; a headerless positions file "
                f"(tissue_positions_list.csv) has {len(POSITION_COLUMNS)}: {list(POSITION_COLUMNS)}")
        table.columns = list(POSITION_COLUMNS)

    table["barcode"] = table["barcode"].astype(str).str.strip()
    for column in POSITION_COLUMNS[1:]:
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any() or not np.isfinite(values.to_numpy(dtype=np.float64)).all():
            raise ValueError(f"positions file {where}: column {column!r} has missing or non-numeric values")
        table[column] = values
    in_tissue = table["in_tissue"].to_numpy()
    if not np.isin(in_tissue, (0, 1)).all():
        raise ValueError(f"positions file {where}: 'in_tissue' must be 0 or 1")
    table["in_tissue"] = in_tissue.astype(bool)
    for column in ("array_row", "array_col"):
        table[column] = table[column].astype(np.int64)
    if not table["barcode"].is_unique:
        raise ValueError(
            f"positions file {where} lists some barcodes twice (e.g. {_show(_duplicates(table['barcode']))})")
    return table.set_index("barcode")


# ---------------------------------------------------------------------------------- messages
def _duplicates(values: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
    series = pd.Series(np.asarray(values, dtype=object))
    return series[series.duplicated()].unique()


def _show(values: Sequence[Any] | np.ndarray) -> str:
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:_N_SHOWN])
    return shown + (", ..." if len(values) > _N_SHOWN else "")
