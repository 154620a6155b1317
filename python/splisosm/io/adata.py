"""An analysis written into an AnnData, so that the file ``write_h5ad`` saves carries it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from splisosm.config import GLMMConfig
from splisosm.data._setup import SetupRecord
from splisosm.glmm._fit import Fitted
from splisosm.results import DUResult, SVResult

#: Default key under which the results are stored (``uns``, ``var`` columns, the layer prefix).
DEFAULT_KEY = "splisosm"

#: The documentation of ``SplisosmGLMM.write_results`` (arguments and what goes where).
WRITE_RESULTS_DOC = """\
Parameters
----------
adata
    Where to write: the AnnData given to :meth:`setup_data` (or any with the same spot and
    isoform names), changed in place; None writes into a copy of :attr:`filtered_adata`.
key_added
    Prefix of every entry written (default ``'splisosm'``).

Returns
-------
anndata.AnnData
    ``adata`` (or the copy), holding:

    * ``uns[key_added]``: ``'sv_results'`` and ``'du_results'`` (the tables of
      :meth:`get_formatted_test_results`, for the tests that were run),
      ``'training_summary'`` (after :meth:`fit`), ``'config'`` (the settings, as JSON) and
      ``'version'``;
    * ``var[f'{key_added}_gene']``: the gene each tested isoform was grouped under (empty for
      isoforms the filters dropped);
    * ``layers[f'{key_added}_fitted_ratios']`` (after :meth:`fit`): fitted isoform ratios, NaN
      for spots and isoforms that were not fitted.

Raises
------
ValueError
    ``adata`` lacks spots or isoforms of the analysis, or its names are not unique.
RuntimeError
    Before :meth:`setup_data`.
"""


def write_analysis(adata: Any, *, key_added: str, config: GLMMConfig, setup: SetupRecord,
                   fitted: Fitted | None, results: dict[str, SVResult | DUResult | None]) -> Any:
    """Write an analysis into ``adata`` (None: a copy of the filtered data); returns the AnnData.

    ``results`` maps ``'sv'`` and ``'du'`` to the tests' results (None where not run).
    """
    target = setup.filtered_adata.copy() if adata is None else adata
    tables = {f"{test}_results": result.to_frame() for test, result in results.items() if result is not None}
    ratios = None
    if fitted is not None:
        tables["training_summary"] = fitted.training_summary().reset_index()
        ratios = fitted.fitted_ratios(key_added).layers[key_added]
    filtered = setup.filtered_adata
    genes = np.empty(filtered.n_vars, dtype=object)
    for name, idx in zip(setup.genes.names, setup.genes.var_index):
        genes[idx] = name
    return write_results(target, key_added=key_added, tables=tables, config=config.to_dict(),
                         version=_version(), gene_of_isoform=pd.Series(genes, index=filtered.var_names),
                         spots=filtered.obs_names, fitted_ratios=ratios)


def _version() -> str:
    from splisosm import __version__

    return __version__


def write_results(adata: Any, *, key_added: str, tables: dict[str, pd.DataFrame], config: dict[str, Any],
                  version: str, gene_of_isoform: pd.Series, spots: pd.Index,
                  fitted_ratios: np.ndarray | None) -> Any:
    """Write the analysis into ``adata`` (see :data:`WRITE_RESULTS_DOC`); returns ``adata``.

    ``gene_of_isoform`` maps the analysed isoforms (var names) to their gene, ``spots`` names the
    analysed spots, and ``fitted_ratios`` is their ``(spots, isoforms)`` ratios or None.
    """
    rows = _positions(adata.obs_names, spots, "spot (obs)")
    cols = _positions(adata.var_names, gene_of_isoform.index, "isoform (var)")
    adata.uns[key_added] = {
        **{name: _h5ad_safe(table) for name, table in tables.items()},
        # the settings hold None and nested dicts, which h5ad attributes cannot store as they are
        "config": json.dumps(config),
        "version": version,
    }
    genes = np.full(adata.n_vars, "", dtype=object)
    genes[cols] = gene_of_isoform.to_numpy(dtype=str)
    adata.var[f"{key_added}_gene"] = genes
    if fitted_ratios is not None:
        layer = np.full(adata.shape, np.nan, dtype=np.float32)
        layer[np.ix_(rows, cols)] = fitted_ratios
        adata.layers[f"{key_added}_fitted_ratios"] = layer
    return adata


def _positions(names: pd.Index, wanted: pd.Index, axis: str) -> np.ndarray:
    """Positions of ``wanted`` in ``names``, or ValueError saying what does not match."""
    if not names.is_unique:
        raise ValueError(f"adata's {axis} names are not unique; make them unique (e.g. "
                         ".var_names_make_unique()) before setup_data() and write_results()")
    found = names.get_indexer(wanted)
    missing = np.flatnonzero(found < 0)
    if missing.size:
        raise ValueError(f"adata lacks {missing.size} {axis} entries of the analysis (e.g. "
                         f"{list(np.asarray(wanted)[missing[:3]])}); write into the AnnData given to "
                         "setup_data() or one with the same names")
    return found


def _h5ad_safe(table: pd.DataFrame) -> pd.DataFrame:
    """The table with columns h5ad can store: flags with missing values as nullable booleans."""
    out = table.copy()
    for name in out.columns:
        column = out[name]
        if column.dtype == object and column.map(lambda v: v is None or isinstance(v, (bool, np.bool_))).all():
            out[name] = pd.array([None if v is None else bool(v) for v in column], dtype="boolean")
    return out
