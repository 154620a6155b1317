"""What ``SplisosmGLMM.setup_data`` produces: the filtered genes, the design and the spatial kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from splisosm.config import GLMMConfig, ModelType
from splisosm.data import _dataset
from splisosm.data._design import resolve_design
from splisosm.spatial._build import KernelPayload, build_spatial
from splisosm.spatial.graph import mutual_knn_adjacency

#: The rest of ``SplisosmGLMM.setup_data``'s docstring: its arguments, errors and warnings.
SETUP_DATA_DOC = """\
Parameters
----------
adata
    AnnData ``(n_spots, n_isoforms)``: counts in ``adata.layers[layer]``, isoform-to-gene
    map in ``adata.var[group_iso_by]``, coordinates in ``adata.obsm[spatial_key]``.
spatial_key
    ``adata.obsm`` key of the ``(n_spots, d)`` coordinates.
adj_key
    ``adata.obsp`` key of a pre-built adjacency; overrides the k-NN graph. Symmetrised
    by averaging (``RuntimeWarning``) when not symmetric.
layer
    Counts layer (non-negative integer counts, 2-D).
group_iso_by
    ``adata.var`` column grouping isoforms into genes.
gene_names
    ``adata.var`` column with display names (default: the ``group_iso_by`` values).
group_gene_by_n_iso
    Group genes by isoform count so ``fit(batch_size > 1)`` can stack them.
design_mtx
    Covariates for DU testing: an obs column name or list of names (categorical columns
    one-hot encoded with all levels), or an ``(n_spots, n_factors)`` array, DataFrame,
    sparse matrix or tensor.
covariate_names
    Names overriding the inferred covariate names.
min_counts
    Minimum total count of an isoform.
min_bin_pct
    Minimum fraction (``<= 1``) or percentage (``> 1``) of spots expressing an isoform.
min_component_size
    Drop spots in spatial graph components smaller than this (``UserWarning``).

Raises
------
ValueError
    Invalid arguments or data, naming the argument at fault.
TypeError
    Unsupported ``design_mtx`` type.

Warns
-----
UserWarning
    Genes dropped for having a single isoform; spots removed by the component filter;
    a disconnected spatial graph (glmm-full); duplicate coordinates; near-constant
    covariates; ``approx_rank=None`` above 5000 spots.
"""


@dataclass(frozen=True, eq=False)
class SetupRecord:
    """The data of an analysis after filtering.

    Attributes
    ----------
    genes
        Per-gene counts, names, keys, isoform counts and isoform positions.
    n_spots
        Spots kept.
    design
        ``(n_spots, n_factors)`` float32 covariates on the model's device, or None.
    covariate_names
        Names of the covariates (None without a design).
    kernel
        Spatial kernel inputs handed to the per-gene models (None for the GLM).
    sp_kernel
        The kernel object (None for the GLM and after loading a saved model).
    filtered_adata
        The filtered AnnData.
    layer, group_iso_by, grouped
        The set-up arguments the later steps read.
    spatial_inputs
        Coordinates and graph of the set-up, from which a white-noise model's score test builds
        the spatial kernel it needs (None after loading a saved model, which keeps neither).
    """

    genes: _dataset.GeneTable
    n_spots: int
    design: torch.Tensor | None
    covariate_names: list[str] | None
    kernel: KernelPayload | None
    sp_kernel: Any
    filtered_adata: Any
    layer: str
    group_iso_by: str
    grouped: bool
    spatial_inputs: dict[str, Any] | None = None

    @property
    def n_genes(self) -> int:
        return len(self.genes.counts)

    @property
    def n_factors(self) -> int:
        return 0 if self.design is None else int(self.design.shape[1])

    def covariate_labels(self) -> list[str]:
        """Covariate names, or ``factor_0, factor_1, ...`` where none were recorded."""
        return list(self.covariate_names or [f"factor_{i}" for i in range(self.n_factors)])

    def counts_of(self, genes: list[int], counts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``(len(genes), n_spots, m)`` counts of genes with the same isoform count ``m``."""
        source = self.genes.counts if counts is None else counts
        return torch.stack([source[g] for g in genes])

    def to_dict(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON-compatible metadata and the tensors (counts, design, kernel) by name."""
        tensors = {f"counts/{g}": c for g, c in enumerate(self.genes.counts)}
        if self.design is not None:
            tensors["design"] = self.design
        kernel = self.kernel
        if kernel is not None:
            if kernel.eigvals is not None:
                tensors["kernel/eigvals"] = torch.from_numpy(np.asarray(kernel.eigvals))
                tensors["kernel/eigvecs"] = torch.from_numpy(np.asarray(kernel.eigvecs))
            if kernel.precision is not None:
                prec = sp.csr_matrix(kernel.precision)
                tensors["kernel/prec_data"] = torch.from_numpy(prec.data)
                tensors["kernel/prec_indices"] = torch.from_numpy(prec.indices.astype(np.int64))
                tensors["kernel/prec_indptr"] = torch.from_numpy(prec.indptr.astype(np.int64))
        meta = {
            "setup_args": {"layer": self.layer, "group_iso_by": self.group_iso_by,
                           "grouped": self.grouped},
            "genes": {
                "names": list(self.genes.names),
                "keys": [str(k) for k in self.genes.keys],
                "n_isos": list(self.genes.n_isos),
                "var_index": [idx.tolist() for idx in self.genes.var_index],
            },
            "n_spots": self.n_spots,
            "covariate_names": self.covariate_names,
            "kernel": None if kernel is None else {"n": self.n_spots},
        }
        return meta, tensors

    @classmethod
    def from_dict(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], adata: Any,
                  device: str) -> SetupRecord:
        """The record :meth:`to_dict` wrote, its design on ``device``."""
        g_meta = meta["genes"]
        genes = _dataset.GeneTable(
            counts=[tensors[f"counts/{g}"] for g in range(len(g_meta["names"]))],
            names=list(g_meta["names"]),
            keys=list(g_meta["keys"]),
            n_isos=list(g_meta["n_isos"]),
            var_index=[np.asarray(idx, dtype=np.int64) for idx in g_meta["var_index"]],
        )
        n = meta["n_spots"]
        kernel = None
        if meta["kernel"] is not None:
            precision = None
            if "kernel/prec_data" in tensors:
                precision = sp.csr_matrix(
                    tuple(tensors[f"kernel/prec_{part}"].numpy() for part in ("data", "indices", "indptr")),
                    shape=(n, n))
            eigvals, eigvecs = tensors.get("kernel/eigvals"), tensors.get("kernel/eigvecs")
            kernel = KernelPayload(eigvals=None if eigvals is None else eigvals.numpy(),
                                   eigvecs=None if eigvecs is None else eigvecs.numpy(),
                                   precision=precision)
        design = tensors.get("design")
        args = meta["setup_args"]
        return cls(genes=genes, n_spots=n, design=None if design is None else design.to(device),
                   covariate_names=meta["covariate_names"], kernel=kernel, sp_kernel=None,
                   filtered_adata=adata, layer=args["layer"], group_iso_by=args["group_iso_by"],
                   grouped=bool(args["grouped"]))


def set_up(
    config: GLMMConfig,
    adata: Any,
    *,
    spatial_key: str,
    adj_key: str | None,
    layer: str,
    group_iso_by: str,
    gene_names: str | None,
    group_gene_by_n_iso: bool,
    design_mtx: Any,
    covariate_names: list[str] | None,
    min_counts: int,
    min_bin_pct: float,
    min_component_size: int,
) -> SetupRecord:
    """Check and filter ``adata`` and build the design and spatial kernel (see ``setup_data``)."""
    _dataset.check_adata_inputs(
        adata, layer=layer, group_iso_by=group_iso_by, min_counts=min_counts,
        min_bin_pct=min_bin_pct, gene_names=gene_names, min_component_size=min_component_size,
        design_mtx=design_mtx, spatial_key=spatial_key, adj_key=adj_key,
    )
    full = config.model_type == ModelType.FULL
    coords = _dataset.read_coordinates(adata, spatial_key)
    adjacency = None
    if adj_key is not None:
        adjacency = _dataset.symmetrised_adjacency(adata.obsp[adj_key], adj_key)
    elif min_component_size > 1 or (full and coords is not None):

        adjacency = mutual_knn_adjacency(coords, config.k_neighbors)
    if min_component_size > 1:
        adata, adjacency, design_mtx, keep = _dataset.component_filter(
            adata, adjacency, design_mtx, min_component_size
        )
        coords = None if coords is None else coords[keep]
    elif full:
        _dataset.warn_if_disconnected(adjacency)
    order, keys, members = _dataset.select_isoforms(
        adata, layer=layer, group_iso_by=group_iso_by, min_counts=min_counts, min_bin_pct=min_bin_pct
    )
    filtered = adata[:, order].copy()
    genes = _dataset.gene_table(filtered, layer=layer, keys=keys, members=members, gene_names=gene_names)
    design, names = resolve_design(design_mtx, filtered.obs, filtered.n_obs, covariate_names)
    # The kernel builds its own k-NN graph from the coordinates unless the graph was supplied
    # or cut down by the component filter.
    kernel_adj = adjacency if (adj_key is not None or min_component_size > 1) else None
    sp_kernel, payload = build_spatial(
        config.model_type, n=filtered.n_obs, coordinates=coords, adjacency=kernel_adj,
        k_neighbors=config.k_neighbors, rho=config.rho, approx_rank=config.approx_rank,
    )
    return SetupRecord(
        genes=genes, n_spots=filtered.n_obs,
        design=None if design is None else torch.from_numpy(design).to(config.device),
        covariate_names=names, kernel=payload, sp_kernel=sp_kernel, filtered_adata=filtered,
        layer=layer, group_iso_by=group_iso_by, grouped=bool(group_gene_by_n_iso),
        spatial_inputs={"coordinates": coords, "adjacency": kernel_adj},
    )
