"""What the per-gene GLM and GLMM share: data intake, fixed effects, ratios and the fit report."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor, nn

from splisosm.glmm._fitting import (
    check_device,
)
from splisosm.ops import multinom_probs

__all__ = ["CountModel"]


def as_tensor(x, dtype: torch.dtype, device: torch.device, name: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x.to_dense() if x.is_sparse else x
    elif hasattr(x, "toarray"):
        t = torch.from_numpy(np.asarray(x.toarray()))
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"`{name}` must be array-like, got {type(x)}") from exc
    return t.to(device=device, dtype=dtype)


def prepare_counts(counts, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Counts as a dense ``(G, n, m)`` tensor; one isoform (``m = 1``) raises
    ``NotImplementedError``, as in splisosm 1.2.0."""
    Y = as_tensor(counts, dtype, device, "counts")
    if Y.dim() == 2:
        Y = Y.unsqueeze(0)
    if Y.dim() != 3:
        raise ValueError(f"`counts` must be 2-D (n, m) or 3-D (G, n, m), got {Y.dim()}-D")
    if Y.shape[-1] < 2:
        raise NotImplementedError("A gene needs at least two isoforms; got one.")
    return Y.contiguous()


def prepare_design(design, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Design ``(n, P)`` (``(1, n, P)`` accepted); ``None`` gives ``P = 0``."""
    if design is None:
        return torch.zeros(n, 0, dtype=dtype, device=device)
    X = as_tensor(design, dtype, device, "design_mtx")
    if X.dim() == 3:
        if X.shape[0] != 1:
            raise ValueError("A batched design matrix (first dimension != 1) is not supported.")
        X = X[0]
    if X.dim() == 1:
        X = X[:, None]
    if X.dim() != 2 or X.shape[0] != n:
        raise ValueError(f"`design_mtx` must have shape ({n}, P), got {tuple(X.shape)}")
    return X.contiguous()


def resolve_diagnose(store_param_history: bool, diagnose: bool | None) -> bool:
    if diagnose is not None:
        warnings.warn("`diagnose` is deprecated; use `store_param_history`.", DeprecationWarning,
                      stacklevel=3)
        return bool(diagnose)
    return bool(store_param_history)


class CountModel(nn.Module):
    """Shared data handling of the GLM and the GLMM."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.n_genes = self.n_spots = self.n_isos = self.n_factors = None
        self.logger = None
        self.fitting_time = 0.0

    def _set_data(self, counts, design_mtx, device) -> None:
        self.device = check_device(device)
        self.counts = prepare_counts(counts, self.dtype, self.device)
        self.n_genes, self.n_spots, self.n_isos = self.counts.shape
        self.X = prepare_design(design_mtx, self.n_spots, self.dtype, self.device)
        self.n_factors = self.X.shape[1]

    @property
    def design_mtx(self) -> Tensor:
        return self.X

    @property
    def X_spot(self) -> Tensor:
        """The design as ``(1, n, P)``: the name and layout splisosm 1.2.0 exposes."""
        return self.X.unsqueeze(0)

    @property
    def convergence(self) -> Tensor:
        """``(G,)`` convergence flags of the last :meth:`fit` (all False before fitting)."""
        if self.logger is None:
            return torch.zeros(self.n_genes, dtype=torch.bool, device=self.device)
        return self.logger.converged

    def _fixed_eta(self) -> Tensor:
        return torch.matmul(self.X, self.beta) + self.bias_eta[:, None, :]

    def get_isoform_ratio(self) -> Tensor:
        """Fitted isoform ratios ``(G, n, m)``."""
        with torch.no_grad():
            return multinom_probs(self._eta())

    def update_params_from_dict(self, params: dict) -> None:
        """Overwrite a subset of parameters (by name) in place."""
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in params.items():
                if name not in own:
                    raise KeyError(f"Unknown parameter {name!r}; known: {', '.join(own)}")
                own[name].copy_(torch.as_tensor(value).to(own[name]))

    # First line as printed by splisosm 1.2.0, which scripts and notebooks may match on.
    _title = ""

    def _description(self) -> list[str]:
        """Model-specific lines of :meth:`__str__`."""
        return []

    def __str__(self) -> str:
        lines = [
            self._title,
            f"- Class: {type(self).__name__}",
            f"- Genes in batch: {self.n_genes}",
            f"- Spots: {self.n_spots}",
            f"- Isoforms per gene: {self.n_isos}",
            f"- Covariates: {self.n_factors}",
            *self._description(),
            f"- Fitting method: {self.fitting_method}",
            f"- Fitting configs: {self.fitting_configs}",
        ]
        if self.logger is None:
            lines.append("- Training: not fitted")
        else:
            lg = self.logger
            lines.append(
                f"- Training: {int(lg.converged.sum())} / {self.n_genes} genes converged in "
                f"{self.fitting_time:.2f} s; median best epoch {int(lg.best_epoch.median())}, "
                f"median best loss {float(lg.best_loss.median()):.4f}")
        return "\n".join(lines)

    # nn.Module's repr lists submodules, of which these models have none
    __repr__ = __str__

    def _fit_report(self, result, store_param_history: bool):
        self.logger = result.logger
        self.fitting_time = result.fitting_time
        if store_param_history:
            return {"loss": result.logger.loss_history, "params": result.param_history}
        return None


