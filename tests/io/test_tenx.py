"""read_visium_probes on tiny Space Ranger outputs written in the documented layout."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from splisosm import SplisosmGLMM
from splisosm.io.tenx import POSITION_COLUMNS, read_visium_probes

GENES = {"GeneA": 2, "GeneB": 3, "GeneC": 2}  # gene name -> number of probes


def _probes(genes: dict[str, int] = GENES) -> dict[str, list[str]]:
    names, gene_ids, ids, regions = [], [], [], []
    for g, (name, n) in enumerate(genes.items()):
        for p in range(n):
            names.append(name)
            gene_ids.append(f"ENSG{g:011d}")
            ids.append(f"ENSG{g:011d}|{name}|{p:07x}")
            regions.append("spliced" if p % 2 else "unspliced")
    return {"id": ids, "name": names, "gene_id": gene_ids, "probe_region": regions}


def _grid(n_side: int, n_out: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Barcodes, array (row, col), full-res pixels (row, col) and in-tissue flags of a small grid."""
    n = n_side * n_side + n_out
    barcodes = [f"{''.join('ACGT'[(i >> (2 * k)) & 3] for k in range(8))}AAAAAAAA-1" for i in range(n)]
    array_rc = np.array([(i // n_side, i % n_side) for i in range(n)])
    pixels = np.column_stack([1000.0 + 150.0 * array_rc[:, 0] + 0.25, 2000.0 + 170.0 * array_rc[:, 1] + 0.5])
    in_tissue = np.array([1] * (n_side * n_side) + [0] * n_out)
    return barcodes, array_rc, pixels, in_tissue


def write_probe_h5(file: Path, dense: np.ndarray, barcodes: list[str], features: dict[str, list],
                   *, vlen: bool = False) -> None:
    """``dense`` is (n_barcodes, n_features); it is stored features x barcodes, CSC, as Space Ranger does."""
    csc = sp.csc_matrix(np.asarray(dense).T)
    string = h5py.string_dtype("utf-8") if vlen else None

    def strings(values: list[str]) -> np.ndarray:
        return np.array(values, dtype=object) if vlen else np.array([v.encode() for v in values])

    with h5py.File(file, "w") as h5:
        h5.attrs["filetype"] = "matrix"
        m = h5.create_group("matrix")
        m.create_dataset("barcodes", data=strings(barcodes), dtype=string)
        m.create_dataset("data", data=csc.data.astype(np.uint32))
        m.create_dataset("indices", data=csc.indices.astype(np.int64))
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        f = m.create_group("features")
        n = csc.shape[0]
        f.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        f.create_dataset("feature_type", data=strings(features.get("feature_type", ["Gene Expression"] * n)),
                         dtype=string)
        f.create_dataset("genome", data=strings(["GRCh38"] * n), dtype=string)
        for key in ("id", "name", "gene_id", "probe_region"):
            if key in features:
                f.create_dataset(key, data=strings(features[key]), dtype=string)
        if "filtered_probes" in features:
            f.create_dataset("filtered_probes", data=np.array(features["filtered_probes"], dtype=bool))


def write_positions(outs: Path, barcodes, array_rc, pixels, in_tissue, *, header: bool = True,
                    order: np.ndarray | None = None) -> Path:
    spatial = outs / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    file = spatial / ("tissue_positions.csv" if header else "tissue_positions_list.csv")
    rows = range(len(barcodes)) if order is None else order
    with open(file, "w", newline="") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(POSITION_COLUMNS)
        for i in rows:
            writer.writerow([barcodes[i], int(in_tissue[i]), int(array_rc[i, 0]), int(array_rc[i, 1]),
                             repr(float(pixels[i, 0])), repr(float(pixels[i, 1]))])
    return file


def make_outs(tmp_path: Path, *, n_side: int = 3, n_out: int = 2, header: bool = True, seed: int = 0,
              features: dict[str, list] | None = None, vlen: bool = False, lam: float = 3.0,
              empty: bool = True):
    """A Space Ranger outs/ folder; returns (outs, dense counts, barcodes, pixels, in_tissue, features)."""
    outs = tmp_path / "outs"
    outs.mkdir()
    barcodes, array_rc, pixels, in_tissue = _grid(n_side, n_out)
    features = _probes() if features is None else features
    rng = np.random.default_rng(seed)
    dense = rng.poisson(lam, size=(len(barcodes), len(features["id"])))
    if empty:
        dense[0, :] = 0  # an empty spot and ...
        dense[:, 1] = 0  # ... an empty probe still round-trip
    write_probe_h5(outs / "raw_probe_bc_matrix.h5", dense, barcodes, features, vlen=vlen)
    write_positions(outs, barcodes, array_rc, pixels, in_tissue, header=header)
    return outs, dense, barcodes, array_rc, pixels, in_tissue, features


# ---------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("header", [True, False], ids=["tissue_positions.csv", "tissue_positions_list.csv"])
def test_reads_counts_coordinates_and_probe_table(tmp_path, header) -> None:
    outs, dense, barcodes, array_rc, pixels, in_tissue, feats = make_outs(tmp_path, header=header)
    adata = read_visium_probes(outs)

    keep = in_tissue == 1
    assert adata.shape == (int(keep.sum()), len(feats["id"]))
    assert list(adata.obs_names) == [b for b, k in zip(barcodes, keep) if k]
    assert list(adata.var_names) == feats["id"]

    counts = adata.layers["counts"]
    assert sp.isspmatrix_csr(counts) or isinstance(counts, sp.csr_array)
    assert np.issubdtype(counts.dtype, np.integer)
    np.testing.assert_array_equal(counts.toarray(), dense[keep])
    np.testing.assert_array_equal(np.asarray(adata.X.toarray()), dense[keep])
    assert adata.X is not counts

    # obsm['spatial'] is (x, y) = (pxl_col_in_fullres, pxl_row_in_fullres)
    np.testing.assert_array_equal(adata.obsm["spatial"], pixels[keep][:, ::-1])
    assert adata.obsm["spatial"].dtype == np.float64
    np.testing.assert_array_equal(adata.obs["array_row"], array_rc[keep, 0])
    np.testing.assert_array_equal(adata.obs["array_col"], array_rc[keep, 1])
    assert adata.obs["in_tissue"].all()

    assert adata.var["gene_symbol"].tolist() == feats["name"]
    assert adata.var["probe_id"].tolist() == feats["id"]
    assert adata.var["gene_id"].tolist() == feats["gene_id"]
    assert adata.var["probe_region"].tolist() == feats["probe_region"]
    assert set(adata.var["genome"]) == {"GRCh38"}


def test_tissue_only_false_keeps_every_barcode(tmp_path) -> None:
    outs, dense, barcodes, _, pixels, in_tissue, _ = make_outs(tmp_path, n_out=4)
    adata = read_visium_probes(outs, tissue_only=False)
    assert list(adata.obs_names) == barcodes
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), dense)
    np.testing.assert_array_equal(adata.obs["in_tissue"].to_numpy(), in_tissue == 1)
    np.testing.assert_array_equal(adata.obsm["spatial"], pixels[:, ::-1])
    assert read_visium_probes(outs).n_obs == int(in_tissue.sum()) < adata.n_obs


def test_positions_are_matched_by_barcode_not_by_row(tmp_path) -> None:
    outs, dense, barcodes, array_rc, pixels, in_tissue, _ = make_outs(tmp_path, n_out=3)
    order = np.random.default_rng(1).permutation(len(barcodes))
    write_positions(outs, barcodes, array_rc, pixels, in_tissue, order=order)  # rewritten, shuffled
    # extra spots with positions but no counts are simply not added
    with open(outs / "spatial" / "tissue_positions.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["TTTTTTTTTTTTTTTT-1", 1, 99, 99, 1.0, 2.0])
    adata = read_visium_probes(outs, tissue_only=False)
    assert list(adata.obs_names) == barcodes
    np.testing.assert_array_equal(adata.obsm["spatial"], pixels[:, ::-1])
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), dense)


def test_new_positions_file_is_preferred_and_explicit_one_honoured(tmp_path) -> None:
    outs, _, barcodes, array_rc, pixels, in_tissue, _ = make_outs(tmp_path, header=True)
    write_positions(outs, barcodes, array_rc, pixels + 1.0, 1 - in_tissue, header=False)  # stale list file
    default = read_visium_probes(outs)
    np.testing.assert_array_equal(default.obsm["spatial"], pixels[in_tissue == 1][:, ::-1])
    old = read_visium_probes(outs, positions_file="spatial/tissue_positions_list.csv")
    np.testing.assert_array_equal(old.obsm["spatial"], pixels[in_tissue == 0][:, ::-1] + 1.0)


def test_variable_length_strings_are_read(tmp_path) -> None:
    outs, dense, _, _, _, in_tissue, feats = make_outs(tmp_path, vlen=True)
    adata = read_visium_probes(outs)
    assert list(adata.var_names) == feats["id"]
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), dense[in_tissue == 1])


def test_filtered_probes_and_feature_type(tmp_path) -> None:
    feats = _probes()
    n = len(feats["id"])
    feats["filtered_probes"] = [i != 2 for i in range(n)]
    feats["feature_type"] = ["Gene Expression"] * (n - 1) + ["Antibody Capture"]
    outs, dense, _, _, _, in_tissue, _ = make_outs(tmp_path, features=feats)
    keep = np.array(feats["filtered_probes"]) & (np.arange(n) != n - 1)

    adata = read_visium_probes(outs)
    assert list(adata.var_names) == [p for p, k in zip(feats["id"], keep) if k]
    assert adata.var["filtered_probes"].all()
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), dense[in_tissue == 1][:, keep])

    everything = read_visium_probes(outs, filtered_probes_only=False, feature_type=None)
    assert everything.n_vars == n
    assert everything.var["filtered_probes"].tolist() == feats["filtered_probes"]
    present = r"\(types present: \['Antibody Capture', 'Gene Expression'\]\)"
    with pytest.raises(ValueError, match=rf"no features of type 'Peaks' {present}"):
        read_visium_probes(outs, feature_type="Peaks")


def test_optional_probe_fields_may_be_absent(tmp_path) -> None:
    feats = {k: v for k, v in _probes().items() if k in ("id", "name")}
    outs, dense, _, _, _, in_tissue, _ = make_outs(tmp_path, features=feats)
    adata = read_visium_probes(outs)
    assert "gene_id" not in adata.var and "probe_region" not in adata.var
    assert adata.var["gene_symbol"].tolist() == feats["name"]
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), dense[in_tissue == 1])


# ---------------------------------------------------------------------------------- errors
def test_missing_folder_file_and_positions(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_visium_probes(tmp_path / "nowhere")
    outs, *_ = make_outs(tmp_path)
    with pytest.raises(NotADirectoryError, match="raw_probe_bc_matrix.h5"):
        read_visium_probes(outs / "raw_probe_bc_matrix.h5")
    with pytest.raises(FileNotFoundError, match=r"filtered_probe_bc_matrix\.h5.*raw_probe_bc_matrix\.h5"):
        read_visium_probes(outs, counts_file="filtered_probe_bc_matrix.h5")
    (outs / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="tissue_positions.csv or tissue_positions_list.csv"):
        read_visium_probes(outs)
    with pytest.raises(FileNotFoundError, match="elsewhere.csv"):
        read_visium_probes(outs, positions_file="elsewhere.csv")


def test_not_hdf5_or_not_a_10x_matrix(tmp_path) -> None:
    outs, *_ = make_outs(tmp_path)
    (outs / "junk.h5").write_text("not hdf5\n")
    with pytest.raises(ValueError, match=r"junk\.h5.*not a readable HDF5"):
        read_visium_probes(outs, counts_file="junk.h5")
    with h5py.File(outs / "other.h5", "w") as h5:
        h5.create_dataset("X", data=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"other\.h5.*no 'matrix' group"):
        read_visium_probes(outs, counts_file="other.h5")
    with h5py.File(outs / "raw_probe_bc_matrix.h5", "a") as h5:
        del h5["matrix/indptr"]
    with pytest.raises(ValueError, match=r"lacks \['indptr'\]"):
        read_visium_probes(outs)


def test_missing_probe_ids_and_gene_level_matrix(tmp_path) -> None:
    outs, dense, barcodes, *_ = make_outs(tmp_path)
    with h5py.File(outs / "raw_probe_bc_matrix.h5", "a") as h5:
        del h5["matrix/features/id"]
    with pytest.raises(ValueError, match=r"no probe ids \('matrix/features/id'\)"):
        read_visium_probes(outs)

    genes = {"id": ["ENSG00000000001", "ENSG00000000002"], "name": ["GeneA", "GeneB"]}
    write_probe_h5(outs / "raw_feature_bc_matrix.h5", dense[:, :2], barcodes, genes)
    with pytest.raises(ValueError, match=r"raw_feature_bc_matrix\.h5.*gene-level"):
        read_visium_probes(outs, counts_file="raw_feature_bc_matrix.h5")


def test_barcodes_absent_from_positions(tmp_path) -> None:
    outs, dense, barcodes, array_rc, pixels, in_tissue, _ = make_outs(tmp_path)
    write_positions(outs, barcodes, array_rc, pixels, in_tissue, order=np.arange(1, len(barcodes)))
    with pytest.raises(ValueError, match=rf"1 of the {len(barcodes)} barcodes.*tissue_positions\.csv.*'{barcodes[0]}'"):
        read_visium_probes(outs)


def test_bad_counts_are_refused(tmp_path) -> None:
    outs, *_ = make_outs(tmp_path)
    file = outs / "raw_probe_bc_matrix.h5"
    with h5py.File(file, "a") as h5:
        data = h5["matrix/data"][()].astype(np.float64)
        data[0] += 0.5
        del h5["matrix/data"]
        h5["matrix/data"] = data
    with pytest.raises(ValueError, match="non-integer counts"):
        read_visium_probes(outs)
    with h5py.File(file, "a") as h5:
        del h5["matrix/data"]
        h5["matrix/data"] = -np.ones(len(data), dtype=np.int32)
    with pytest.raises(ValueError, match="negative counts"):
        read_visium_probes(outs)
    with h5py.File(file, "a") as h5:
        del h5["matrix/data"]
        h5["matrix/data"] = np.ones(len(data), dtype=np.uint32)
        indptr = h5["matrix/indptr"][()]
        del h5["matrix/indptr"]
        h5["matrix/indptr"] = indptr[:-1]
    with pytest.raises(ValueError, match="'matrix/indptr' is not a valid column pointer"):
        read_visium_probes(outs)


def test_bad_positions_are_refused(tmp_path) -> None:
    outs, _, barcodes, array_rc, pixels, in_tissue, _ = make_outs(tmp_path, header=False)
    file = outs / "spatial" / "tissue_positions_list.csv"
    file.write_text("".join(f"{b},1,0,0\n" for b in barcodes))
    with pytest.raises(ValueError, match="has 4 columns"):
        read_visium_probes(outs)
    write_positions(outs, barcodes, array_rc, pixels, 0 * in_tissue, header=False)
    with pytest.raises(ValueError, match="no barcode .* in_tissue=1"):
        read_visium_probes(outs)
    assert read_visium_probes(outs, tissue_only=False).n_obs == len(barcodes)
    (outs / "spatial" / "tissue_positions.csv").write_text("barcode,in_tissue,array_row\nAAAA-1,1,0\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['array_col'"):
        read_visium_probes(outs)


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.filterwarnings("ignore:.*did not converge:UserWarning")  # 5 epochs are deliberately few
def test_reader_output_fits_with_splisosm(tmp_path) -> None:
    outs, *_ = make_outs(tmp_path, n_side=5, n_out=3, seed=3, lam=6.0, empty=False)
    adata = read_visium_probes(outs)
    assert adata.shape == (25, sum(GENES.values()))

    model = SplisosmGLMM(model_type="glmm-full", device="cpu", fitting_configs={"max_epochs": 5})
    model.setup_data(adata, group_gene_by_n_iso=True)
    assert model.n_genes == len(GENES)
    model.fit(print_progress=False)
    fitted = model.get_fitted_models()
    assert len(fitted) == len(GENES)
    assert dict(zip(model.gene_names, model.n_isos_per_gene)) == GENES
    summary = model.get_training_summary()
    assert len(summary) == len(GENES)
