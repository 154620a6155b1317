"""save / load round trips and rejection of foreign or incompatible files."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.glmm_data import make_adata
from splisosm.hyptest_glmm import SplisosmGLMM
from splisosm.io.persistence import FORMAT_VERSION


@pytest.fixture(scope="module")
def fitted() -> SplisosmGLMM:
    model = SplisosmGLMM(fitting_configs={"max_epochs": 15})
    model.setup_data(make_adata(du_effect=[1.0, 0, 0, 0]), group_gene_by_n_iso=True,
                     gene_names="gene_label", design_mtx="cov")
    model.fit(from_null=True, batch_size=2, print_progress=False, random_seed=0)
    model.test_spatial_variability(use_perm_null=True, n_perms_per_gene=2, random_seed=1, print_progress=False)
    model.test_differential_usage(print_progress=False)
    return model


def test_round_trip_identical_tables(fitted, tmp_path) -> None:
    path = tmp_path / "model.splisosm"
    fitted.save(path)
    assert fitted.adata is not None and fitted.sp_kernel is not None  # the live object is untouched
    loaded = SplisosmGLMM.load(path)
    assert loaded.adata is None and loaded.sp_kernel is None
    for test in ("sv", "du"):
        pd.testing.assert_frame_equal(
            fitted.get_formatted_test_results(test, with_gene_summary=True),
            loaded.get_formatted_test_results(test, with_gene_summary=True),
        )
    pd.testing.assert_frame_equal(fitted.get_training_summary(), loaded.get_training_summary())
    for attr in ("n_genes", "n_spots", "n_isos_per_gene", "n_factors", "gene_names", "covariate_names", "model_type"):
        assert getattr(loaded, attr) == getattr(fitted, attr)
    torch.testing.assert_close(loaded.design_mtx, fitted.design_mtx)
    assert str(loaded) == str(fitted)
    # models, ratios and tests work on the loaded object
    a, b = fitted.get_fitted_models()[1], loaded.get_fitted_models()[1]
    torch.testing.assert_close(a.get_isoform_ratio(), b.get_isoform_ratio())
    np.testing.assert_array_equal(
        fitted.get_fitted_ratios_anndata().layers["fitted_ratios"],
        loaded.get_fitted_ratios_anndata().layers["fitted_ratios"],
    )
    res_a = fitted.test_differential_usage(print_progress=False, return_results=True)
    res_b = loaded.test_differential_usage(print_progress=False, return_results=True)
    torch.testing.assert_close(res_a["statistic"], res_b["statistic"])
    # the permutation cache survives: a repeated permutation test reuses it
    np.testing.assert_array_equal(loaded.permutation_cache.stats, fitted.permutation_cache.stats)
    sv = loaded.test_spatial_variability(use_perm_null=True, n_perms_per_gene=2, random_seed=1,
                                         print_progress=False, return_results=True)
    np.testing.assert_array_equal(sv["pvalue"], fitted.sv_results.pvalue)


def test_map_location_and_no_pickle(fitted, tmp_path) -> None:
    path = tmp_path / "m.zip"
    fitted.save(path)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["filtered.h5ad", "meta.json", "tensors.safetensors"]
    loaded = SplisosmGLMM.load(str(path), map_location="cpu")
    assert loaded.device == "cpu" and loaded.design_mtx.device.type == "cpu"


def test_round_trip_before_fit(tmp_path) -> None:
    model = SplisosmGLMM(model_type="glm", approx_rank=None)
    model.setup_data(make_adata())
    model.save(tmp_path / "m")
    loaded = SplisosmGLMM.load(tmp_path / "m")
    assert loaded.approx_rank is None and loaded.get_fitted_models() == []
    pd.testing.assert_frame_equal(loaded.extract_feature_summary(print_progress=False),
                                  model.extract_feature_summary(print_progress=False))
    empty = SplisosmGLMM()
    empty.save(tmp_path / "e")
    assert SplisosmGLMM.load(tmp_path / "e").n_genes is None


def test_rejects_foreign_files(tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a model saved"):
        SplisosmGLMM.load(text)
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("meta.json", json.dumps({"format": "something-else"}))
        zf.writestr("tensors.safetensors", b"")
    with pytest.raises(ValueError, match="not a model saved"):
        SplisosmGLMM.load(other_zip)


def test_rejects_other_format_version(fitted, tmp_path) -> None:
    path = tmp_path / "m"
    fitted.save(path)
    newer = tmp_path / "newer"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(newer, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "meta.json":
                meta = json.loads(data)
                meta["format_version"] = FORMAT_VERSION + 1
                data = json.dumps(meta).encode()
            dst.writestr(name, data)
    with pytest.raises(ValueError, match="format version"):
        SplisosmGLMM.load(newer)
