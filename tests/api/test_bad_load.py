"""Loading what is not a sound saved model, and running the CLI on what is not an .h5ad file.

Every refusal must be an error of ours whose message names the culprit (the path, and the
archive member, key, tensor or version at fault), never a raw zipfile, json, safetensors, h5py
or scipy error, and nothing in a file may run as code while it is read.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable

import anndata as ad
import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from helpers.glmm_data import make_adata
from splisosm.cli import main
from splisosm.hyptest_glmm import SplisosmGLMM
from splisosm.io.persistence import FORMAT_VERSION, DamagedModelError

META, TENSORS, ADATA = "meta.json", "tensors.safetensors", "filtered.h5ad"
NOT_OURS = "is not a model saved by SplisosmGLMM.save()"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
    """A small fitted model with every part save() writes: kernel, design, states, tests, permutations."""
    model = SplisosmGLMM(fitting_configs={"max_epochs": 20})
    model.setup_data(make_adata(side=5, n_isos=(2, 3), du_effect=[1.0, 0.0]), group_gene_by_n_iso=True,
                     design_mtx="cov")
    with warnings.catch_warnings():
        # The LLR after joint_gd warns that it is uninformative; only the saved parts matter here.
        warnings.simplefilter("ignore")
        model.fit(from_null=True, print_progress=False, random_seed=0)
        model.test_spatial_variability(use_perm_null=True, n_perms_per_gene=2, random_seed=1,
                                       print_progress=False)
        model.test_differential_usage(print_progress=False)
    path = tmp_path_factory.mktemp("saved") / "model.splisosm"
    model.save(path)
    return path


def rewrite(src: pathlib.Path, dst: pathlib.Path, *, meta: Callable[[dict], None] | None = None,
            tensors: Callable[[dict], None] | None = None, members: dict[str, bytes | None] | None = None
            ) -> pathlib.Path:
    """Copy the archive ``src`` to ``dst``, editing meta.json and the tensors in place.

    ``members`` maps a member name to the bytes that replace (or add) it, or to None to drop it.
    """
    members = dict(members or {})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == META and meta is not None:
                content = json.loads(data)
                meta(content)
                data = json.dumps(content).encode()
            if name == TENSORS and tensors is not None:
                content = st_load(data)
                tensors(content)
                data = st_save(content)
            if name in members:
                data = members.pop(name)
            if data is not None:
                zout.writestr(name, data)
        for name, data in members.items():
            zout.writestr(name, data)
    return dst


def member_bytes(path: pathlib.Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(name)


def load_error(path, cls: type[Exception] = ValueError, **kwargs) -> str:
    """The message of the error, exactly of class ``cls``, raised by loading ``path``; it names the path."""
    with pytest.raises(cls) as info:
        SplisosmGLMM.load(path, **kwargs)
    assert type(info.value) is cls, type(info.value)
    message = str(info.value)
    assert repr(str(path)) in message, message
    return message


def test_untouched_copy_loads(saved, tmp_path) -> None:
    # The tampering helper alone must not break the archive, or every test below proves nothing.
    loaded = SplisosmGLMM.load(rewrite(saved, tmp_path / "copy"))
    assert loaded.n_genes == 2 and loaded.permutation_cache is not None
    assert loaded.setup_record.kernel.precision is not None


# ---------------------------------------------------------------------------- wrong path
def test_missing_path(tmp_path) -> None:
    message = load_error(tmp_path / "nowhere.splisosm", FileNotFoundError)
    assert "does not exist" in message


def test_directory(tmp_path) -> None:
    message = load_error(tmp_path, IsADirectoryError)
    assert "is a directory" in message and "save()" in message


# ---------------------------------------------------------------------------- not ours
def _zip_without_meta(path: pathlib.Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data.csv", "a,b\n1,2\n")


def _zip_of_other_format(path: pathlib.Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(META, json.dumps({"format": "something-else", "format_version": 1}))
        zf.writestr(TENSORS, b"")


def _zip_with_json_list(path: pathlib.Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(META, "[1, 2]")
        zf.writestr(TENSORS, b"")


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_text("hello"),
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(bytes(range(256)) * 8),
        lambda p: p.write_text("gene,count\nA,1\n"),
        _zip_without_meta,
        _zip_of_other_format,
        _zip_with_json_list,
        lambda p: torch.save({"weights": torch.zeros(3)}, p),
    ],
    ids=["text", "empty", "binary", "csv", "zip-without-meta", "other-format", "meta-not-an-object",
         "torch-save"],
)
def test_not_ours(tmp_path, make) -> None:
    path = tmp_path / "file"
    make(path)
    assert NOT_OURS in load_error(path)


def test_other_format_version(saved, tmp_path) -> None:
    def newer(meta: dict) -> None:
        meta["format_version"] = FORMAT_VERSION + 1

    message = load_error(rewrite(saved, tmp_path / "newer", meta=newer))
    assert f"format version {FORMAT_VERSION + 1}" in message and f"reads version {FORMAT_VERSION}" in message


# ---------------------------------------------------------------------------- damaged
def _flip_byte_in_member(path: pathlib.Path, name: str) -> None:
    """Corrupt one byte of a stored member's data, leaving the zip structure intact."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("member", [META, TENSORS, ADATA])
def test_bad_crc(saved, tmp_path, member) -> None:
    path = tmp_path / "crc"
    path.write_bytes(saved.read_bytes())
    _flip_byte_in_member(path, member)
    message = load_error(path, DamagedModelError)
    assert "is damaged" in message and repr(member) in message and "CRC" in message


def test_truncated_file(saved, tmp_path) -> None:
    path = tmp_path / "half"
    path.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    message = load_error(path, DamagedModelError)
    assert "is damaged" in message and "truncated" in message


@pytest.mark.parametrize(
    "member, data",
    [
        (META, b'{"format": "splisosm-glmm", "format_version": '),
        (META, b"\xff\xfe not utf-8"),
        (TENSORS, None),  # the saved tensors, cut in half
        (TENSORS, b"garbage"),
        (ADATA, b"garbage"),
        (ADATA, None),  # the saved AnnData, cut in half
    ],
    ids=["meta-bad-json", "meta-bad-utf8", "tensors-truncated", "tensors-garbage", "adata-garbage",
         "adata-truncated"],
)
def test_damaged_member(saved, tmp_path, member, data) -> None:
    if data is None:
        whole = member_bytes(saved, member)
        data = whole[: len(whole) // 2]
    message = load_error(rewrite(saved, tmp_path / "damaged", members={member: data}), DamagedModelError)
    assert "is damaged" in message and f"member {member!r} cannot be read" in message


# ---------------------------------------------------------------------------- no code runs
class _Payload:
    """Pickles to a call that creates ``marker``: proof of code execution if the file appears."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_payload_never_runs(saved, tmp_path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live: unpickling it runs code
    assert marker.exists()
    marker.unlink()

    whole = tmp_path / "torch_save"
    torch.save(_Payload(marker), whole)
    assert NOT_OURS in load_error(whole)
    for member in (META, TENSORS, ADATA):
        path = rewrite(saved, tmp_path / f"payload_in_{member}", members={member: payload})
        message = load_error(path, DamagedModelError)
        assert f"member {member!r} cannot be read" in message
    assert not marker.exists()


# ---------------------------------------------------------------------------- tampered
def _set(key: str, value) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        meta[key] = value
    return edit


def _edit_meta(path_in_meta: tuple, value) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        target = meta
        for key in path_in_meta[:-1]:
            target = target[key]
        target[path_in_meta[-1]] = value
    return edit


def _drop_gene_name(meta: dict) -> None:
    meta["genes"]["names"].pop()


def _drop_state_row(meta: dict) -> None:
    meta["states"]["glmm-full"].pop()


def _drop(name: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.pop(name)


def _put(name: str, value: torch.Tensor) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[name] = value
    return edit


def _shrink(name: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[name] = tensors[name][:-1].contiguous()
    return edit


TAMPERED_META = [
    (_set("evil", 1), ["meta.json", "unknown keys ['evil']"]),
    (_set("n_spots", "25"), ["'n_spots'", "expected int or null"]),
    (_set("has_data", False), ["unexpected member 'filtered.h5ad' although 'has_data' is false"]),
    (_set("model_type", "glmm-huge"), ["model_type", "glmm-huge"]),
    (_set("kernel", {"n": 26}), ["kernel entry", "25 spots"]),
    (_set("perm_key", [1, 5, 1]), ["perm/stats"]),
    (_edit_meta(("model_configs", "fitting_methd"), "joint_gd"),
     ["model_configs", "unknown keys ['fitting_methd']"]),
    (_edit_meta(("genes", "n_isos", 1), 4), ["gene 1 has 4 isoforms but 3 var_index entries"]),
    (_edit_meta(("states", "glmm-full", 0, "n_isos"), 3), ["'glmm-full'", "gene 0", "3 isoforms"]),
    (_edit_meta(("states", "glmm-full", 0, "secret"), 1), ["'glmm-full' of gene 0", "unknown keys ['secret']"]),
    (_edit_meta(("states", "glmm-full", 0, "params"), 5), ["inconsistent", "TypeError"]),
    (_edit_meta(("results", "xx"), {}), ["unknown tests ['xx']"]),
    (_drop_gene_name, ["different numbers of genes"]),
    (_drop_state_row, ["1 fitted 'glmm-full' genes for 2 genes"]),
]


@pytest.mark.parametrize("edit, expected", TAMPERED_META, ids=[
    "extra-key", "n-spots-type", "has-data-flag", "bad-model-type", "kernel-n", "perm-key", "extra-config-key",
    "n-isos", "state-n-isos", "state-extra-key", "state-params-type", "unknown-test", "gene-count",
    "state-count",
])
def test_tampered_meta(saved, tmp_path, edit, expected) -> None:
    message = load_error(rewrite(saved, tmp_path / "tampered", meta=edit), DamagedModelError)
    assert "is damaged" in message
    for part in expected:
        assert part in message, (part, message)


TAMPERED_TENSORS = [
    (_drop("counts/1"), ["tensor 'counts/1' is missing"]),
    (_drop("kernel/prec_indptr"), ["tensor 'kernel/prec_indptr' is missing"]),
    (_put("extra/x", torch.zeros(2)), ["unexpected tensor 'extra/x'"]),
    (_shrink("counts/0"), ["counts/0", "(24, 2)", "(25, 2)"]),
    (_shrink("design"), ["'design'", "spots x covariates"]),
    (_shrink("kernel/eigvecs"), ["kernel/eigvecs", "(25, 25)"]),
    (_shrink("kernel/eigvals"), ["kernel/eigvecs", "the 24 entries of 'kernel/eigvals'"]),
    (_put("kernel/prec_indices", torch.full((107,), 99, dtype=torch.int64)), ["kernel precision", "25 x 25"]),
    (_shrink("du/statistic"), ["du/statistic", "one row per gene (2)"]),
    (_shrink("perm/stats"), ["perm/stats", "permutations x genes"]),
    (_put("state/glmm-full/0/sigma", torch.zeros(())), ["state/glmm-full/0/sigma", "leading gene axis"]),
]


@pytest.mark.parametrize("edit, expected", TAMPERED_TENSORS, ids=[
    "missing-counts", "partial-precision", "extra-tensor", "counts-rows", "design-rows", "eigvecs-rows",
    "eigvals-length", "precision-indices", "du-rows", "perm-rows", "state-axis",
])
def test_tampered_tensors(saved, tmp_path, edit, expected) -> None:
    message = load_error(rewrite(saved, tmp_path / "tampered", tensors=edit), DamagedModelError)
    assert "saved model is inconsistent" in message
    for part in expected:
        assert part in message, (part, message)


def test_tampered_members(saved, tmp_path) -> None:
    missing = load_error(rewrite(saved, tmp_path / "no_adata", members={ADATA: None}), DamagedModelError)
    assert f"member {ADATA!r} is missing although 'has_data' is true" in missing
    extra = load_error(rewrite(saved, tmp_path / "extra", members={"run_me.py": b"print('hi')"}),
                       DamagedModelError)
    assert "unexpected member 'run_me.py'" in extra
    small = tmp_path / "small.h5ad"
    ad.AnnData(np.zeros((3, 2), dtype=np.float32)).write_h5ad(small)
    wrong = load_error(rewrite(saved, tmp_path / "other_adata", members={ADATA: small.read_bytes()}),
                       DamagedModelError)
    assert f"{ADATA} has shape (3, 2), expected (25, 5)" in wrong


# ---------------------------------------------------------------------------- devices
def test_unknown_map_location(saved) -> None:
    for bad in ("gpu", ""):
        with pytest.raises(ValueError, match="map_location") as info:
            SplisosmGLMM.load(saved, map_location=bad)
        assert type(info.value) is ValueError
        assert repr(bad) in str(info.value) and "cpu, cuda, mps" in str(info.value)
    with pytest.raises(ValueError, match="only device index 0"):
        SplisosmGLMM.load(saved, map_location="cuda:1")


def test_map_location_spelt_as_torch_load_accepts(saved) -> None:
    # torch.load accepts these spellings, so scripts written for splisosm 1.2.0 may use them.
    for location in ("cpu:0", torch.device("cpu")):
        assert SplisosmGLMM.load(saved, map_location=location).device == "cpu"


def test_unavailable_map_location(saved, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device in ("cuda", "mps"):
        with pytest.raises(ValueError) as info:
            SplisosmGLMM.load(saved, map_location=device)
        assert type(info.value) is ValueError
        assert f"map_location={device!r} is not available" in str(info.value)


def test_saved_device_unavailable(saved, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = rewrite(saved, tmp_path / "on_cuda", meta=_set("device", "cuda"))
    message = load_error(path)
    assert "device it was saved for" in message and "'cuda'" in message and "map_location='cpu'" in message
    assert SplisosmGLMM.load(path, map_location="cpu").device == "cpu"
    odd = load_error(rewrite(saved, tmp_path / "odd", meta=_set("device", "gpu")))
    assert "Invalid device 'gpu'" in odd


# ---------------------------------------------------------------------------- CLI input
def _hdf5_not_anndata(path: pathlib.Path) -> None:
    with h5py.File(path, "w") as f:
        f["x"] = [1, 2, 3]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # anndata on an HDF5 file it did not write
@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_text("just some notes\n"), "no HDF5 signature"),
        (lambda p: p.write_text("gene,count\nA,1\n"), "no HDF5 signature"),
        (lambda p: p.write_bytes(b""), "no HDF5 signature"),
        (lambda p: p.mkdir(), "directory"),
        (_hdf5_not_anndata, ""),
    ],
    ids=["text", "csv", "empty", "directory", "hdf5-not-anndata"],
)
def test_cli_input_not_h5ad(tmp_path, capsys, make, reason) -> None:
    path = tmp_path / "input.h5ad"
    make(path)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--sv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"splisosm-glmm: error: input {str(path)!r} is not an AnnData .h5ad file")
    assert reason in err[0]
    assert not (tmp_path / "out").exists()
