"""The per-gene patience logger, the optimisers and the shared training loop of the models.

Kept free of model maths: a model hands the loop a closure computing its per-gene loss and an
optional method-specific update, and the loop does the bookkeeping (early stopping, best-parameter
snapshots, warnings, timing).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from splisosm.config import Device
from splisosm.ops._native import check_cuda_kernels


def check_device(device, name: str = "device") -> torch.device:
    """Accept exactly ``'cpu'``, ``'cuda'`` or ``'mps'``, and only where torch can use it.

    ``'cuda'`` also needs the extension's CUDA kernels when torch has CUDA (see
    :func:`splisosm.ops._native.check_cuda_kernels`). ``name`` is the argument named in errors.
    """
    device = Device.check(name, device)
    if device == Device.CUDA:
        # A build without the CUDA kernels is the problem to name first: a GPU would not help.
        check_cuda_kernels()
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible to torch")
            raise ValueError(f"{name}='cuda' is not available: {why} (torch {torch.__version__}); "
                             f"use {name}='cpu'.")
    if device == Device.MPS and not torch.backends.mps.is_available():
        raise ValueError(f"{name}='mps' is not available: torch finds no Apple GPU (MPS) here; "
                         f"use {name}='cpu'.")
    return torch.device(device)


#: End of the per-fit warning; ``SplisosmGLMM`` silences it and counts all batches in one.
NOT_CONVERGED = "gene(s) did not converge"


@dataclass
class PatienceLogger:
    """Per-gene early stopping: a gene stops after ``patience`` epochs without a gain of ``tol``.

    A non-finite loss is never an improvement; it advances the patience counter, so a diverged
    gene stops, but it is reported as not converged (``converged`` requires the loss at the
    stopping epoch to be finite).
    """

    n_genes: int
    tol: float
    patience: int
    tol_relative: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        g, dev = self.n_genes, self.device
        self.best_loss = torch.full((g,), float("inf"), dtype=torch.float64, device=dev)
        self.best_epoch = torch.full((g,), -1, dtype=torch.long, device=dev)
        self.counter = torch.zeros(g, dtype=torch.long, device=dev)
        self.stopped = torch.zeros(g, dtype=torch.bool, device=dev)
        self.converged = torch.zeros(g, dtype=torch.bool, device=dev)
        self.epoch = 0
        self._history: list[Tensor] = []

    @property
    def convergence(self) -> Tensor:
        """``converged`` under the name splisosm 1.2.0 scripts read."""
        return self.converged

    @property
    def loss_history(self) -> Tensor:
        """``(epochs, G)`` losses as logged (NaN shown as +inf)."""
        if not self._history:
            return torch.empty(0, self.n_genes, dtype=torch.float64, device=self.device)
        return torch.stack(self._history)

    def log(self, loss: Tensor) -> Tensor:
        """Record one epoch's ``(G,)`` losses; return the mask of genes whose best was updated."""
        loss = loss.detach().to(torch.float64)
        finite = torch.isfinite(loss)
        loss = torch.nan_to_num(loss, nan=float("inf"), posinf=float("inf"))
        self._history.append(loss)
        best = self.best_loss
        thr = self.tol * best.abs().clamp(min=1.0) if self.tol_relative else self.tol
        gap = torch.where(finite, best - loss, torch.full_like(loss, -float("inf")))
        # best == inf and loss finite gives gap == inf: the first finite loss is a big improvement.
        big = gap >= thr
        improved = (gap > 0) & ~self.stopped
        self.counter = torch.where(big, torch.zeros_like(self.counter), self.counter + 1)
        self.best_loss = torch.where(improved, loss, best)
        self.best_epoch = torch.where(improved, torch.full_like(self.best_epoch, self.epoch),
                                      self.best_epoch)
        newly = ~self.stopped & (self.counter >= self.patience)
        self.converged = self.converged | (newly & finite)
        self.stopped = self.stopped | newly
        self.epoch += 1
        return improved

    def summary_rows(self) -> list[dict]:
        """Per-gene ``converged / best_loss / best_epoch`` as Python values (one host sync)."""
        conv = self.converged.tolist()
        loss = self.best_loss.tolist()
        epoch = self.best_epoch.tolist()
        return [
            {"converged": c, "best_loss": best, "best_epoch": e}
            for c, best, e in zip(conv, loss, epoch)
        ]


def make_logger(params: dict[str, Tensor], configs: dict) -> PatienceLogger:
    """A patience logger for the genes of ``params`` with the configured tolerances."""
    first = next(iter(params.values()))
    return PatienceLogger(first.shape[0], float(configs["tol"]), int(configs["patience"]),
                          bool(configs.get("tol_relative", False)), first.device)


def _gene_where(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Select along the leading gene axis of ``new``/``old`` with a ``(G,)`` mask."""
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


@dataclass
class FitResult:
    """What :func:`run_training` returns: the logger, the wall time and optional history."""

    logger: PatienceLogger
    fitting_time: float
    param_history: list[dict[str, Tensor]] | None = None


def run_training(
    params: dict[str, Tensor],
    eval_loss: Callable[[], Tensor],
    epoch_step: Callable[..., bool | None],
    configs: dict,
    *,
    fused: bool = False,
    store_param_history: bool = False,
    verbose: bool = False,
    quiet: bool = False,
    positive_params: tuple[str, ...] = (),
    logger: PatienceLogger | None = None,
) -> FitResult:
    """The training loop shared by every fitting method: per-gene early stopping and best snapshots.

    Parameters
    ----------
    params
        Name -> parameter tensor (all ``(G, ...)``); best values are snapshotted and restored.
    eval_loss
        Returns the current ``(G,)`` loss (``-objective``) without gradients.
    epoch_step
        ``epoch_step(epoch, active)`` performs the method's update for the 0-based ``epoch``;
        ``active`` is the ``(G,)`` mask of genes not yet stopped. With ``fused=True`` it is
        called as ``epoch_step(epoch, active, record)``: the post-step loss of the previous
        epoch is the loss the step computes anyway before its own update, so the step passes
        it to ``record`` (from epoch 1 on; ``record`` returns True when every gene has stopped,
        and the step must then return True without updating). This saves one objective
        evaluation per epoch and yields exactly the same log.
    configs
        Resolved fitting configs (``tol``, ``tol_relative``, ``patience``, ``max_epochs``).
    positive_params
        Parameters replaced by their absolute value after restoring the best values (``sigma``;
        after the restore, so that the stored values are non-negative).
    logger
        A fresh logger from :func:`make_logger` when the step needs to see it; else made here.
    """
    logger = logger if logger is not None else make_logger(params, configs)
    best = {k: p.detach().clone() for k, p in params.items()}
    history: list[dict[str, Tensor]] | None = [] if store_param_history else None

    def record(loss: Tensor) -> bool:
        """Log one epoch's post-step losses at the current parameters; True when all stopped."""
        loss = loss.detach()
        epoch = logger.epoch
        bad = ~torch.isfinite(loss)
        improved = logger.log(loss)
        with torch.no_grad():
            for k, p in params.items():
                best[k] = _gene_where(improved, p.detach(), best[k])
        if history is not None:
            history.append({k: p.detach().clone() for k, p in params.items()})
        n_bad, all_done = (int(v) for v in torch.stack([bad.sum(), logger.stopped.all()]).tolist())
        if n_bad:
            warnings.warn(f"Non-finite loss for {n_bad} gene(s) at epoch {epoch}.", UserWarning,
                          stacklevel=4)
        if verbose and not quiet and epoch % 10 == 0:
            finite_best = logger.best_loss[torch.isfinite(logger.best_loss)]
            print(f"Epoch {epoch}: mean best loss {finite_best.mean().item():.4f}")
        return bool(all_done)

    start = time.perf_counter()
    max_epochs = int(configs["max_epochs"])
    done = False
    for epoch in range(max_epochs):
        if fused:
            done = bool(epoch_step(epoch, ~logger.stopped, record if epoch > 0 else None))
        else:
            epoch_step(epoch, ~logger.stopped)
            with torch.no_grad():
                done = record(eval_loss())
        if done:
            break
    if fused and not done and max_epochs > 0:
        with torch.no_grad():
            record(eval_loss())
    fitting_time = time.perf_counter() - start
    with torch.no_grad():
        seen = logger.best_epoch >= 0
        for k, p in params.items():
            p.copy_(_gene_where(seen, best[k], p.detach()))
            if k in positive_params:
                p.abs_()
    if not quiet:
        report_fit(logger, fitting_time)
    return FitResult(logger, fitting_time, history)


def report_fit(logger: PatienceLogger, fitting_time: float) -> None:
    """Warn about genes that did not converge and print a one-line summary of a fit."""
    n_genes = logger.n_genes
    n_conv = int(logger.converged.sum())
    if n_conv < n_genes:
        warnings.warn(f"{n_genes - n_conv} of {n_genes} {NOT_CONVERGED}.", UserWarning, stacklevel=4)
    finite_best = logger.best_loss[torch.isfinite(logger.best_loss)]
    mean_best = finite_best.mean().item() if finite_best.numel() else float("nan")
    print(f"Fitted {n_genes} gene(s) in {fitting_time:.2f}s over {logger.epoch} epochs; "
          f"mean best loss {mean_best:.4f}.")


def logger_from_outcome(configs: dict, loss_history: Tensor, best_loss: Tensor,
                        best_epoch: Tensor, converged: Tensor) -> PatienceLogger:
    """A finished :class:`PatienceLogger` holding the outcome of a fit done elsewhere."""
    logger = PatienceLogger(best_loss.shape[0], float(configs["tol"]), int(configs["patience"]),
                            bool(configs.get("tol_relative", False)), best_loss.device)
    logger._history = list(loss_history.unbind(0))
    logger.best_loss, logger.best_epoch = best_loss, best_epoch
    logger.converged = converged
    logger.stopped = converged.clone()
    logger.epoch = loss_history.shape[0]
    return logger


class _Descent:
    """A gradient-descent optimiser over a fixed list of parameters, without ``torch.optim``.

    The first ``torch.optim`` optimiser of a process imports ``torch._dynamo`` (1.1-1.3 s on a
    2-core machine) and each of its steps passes through hooks and profiler records; a fit needs
    only the plain update rules, written here with the same tensor operations in the same order
    as torch's single-tensor implementations, so the results are bit for bit the same.
    """

    def __init__(self, params: list[Tensor], lr: float) -> None:
        self.params = params
        self.lr = float(lr)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class Adam(_Descent):
    """``torch.optim.Adam(params, lr)`` with its default betas and eps."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, params: list[Tensor], lr: float) -> None:
        super().__init__(params, lr)
        self.steps = [0] * len(params)  # per parameter, as torch counts them
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.BETAS
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad, m, v = p.grad, self.exp_avg[i], self.exp_avg_sq[i]
            self.steps[i] += 1
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1 = 1 - beta1 ** self.steps[i]
            bias2_sqrt = (1 - beta2 ** self.steps[i]) ** 0.5
            denom = (v.sqrt() / bias2_sqrt).add_(self.EPS)
            p.addcdiv_(m, denom, value=-(self.lr / bias1))


class SGD(_Descent):
    """``torch.optim.SGD(params, lr)`` without momentum."""

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)


def make_optimizer(params: list[Tensor], configs: dict) -> _Descent | torch.optim.LBFGS | None:
    """Adam / SGD (no momentum) / L-BFGS over the trainable parameters (None if there are none)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return None
    lr = float(configs["lr"])
    name = configs["optim"]
    if name == "adam":
        return Adam(params, lr)
    if name == "sgd":
        return SGD(params, lr)
    return torch.optim.LBFGS(params, lr=lr, max_iter=20, line_search_fn="strong_wolfe")


def optimizer_step(
    optimizer: _Descent | torch.optim.LBFGS | None,
    losses: Callable[[], Tensor],
    record: Callable[[Tensor], bool] | None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> bool:
    """One optimiser step on ``reduce(losses())`` (default: the batch mean of the ``(G,)`` loss).

    The per-gene losses at the current parameters are first handed to ``record`` (the previous
    epoch's post-step log); if it reports that every gene has stopped, no step is taken and True
    is returned. ``reduce`` is called after that log, so it can look at which genes are still
    active. L-BFGS re-evaluates its closure as it needs, so it gets a separate evaluation for
    the log.
    """
    def total(loss: Tensor) -> Tensor:
        return loss.mean() if reduce is None else reduce(loss)

    if isinstance(optimizer, torch.optim.LBFGS):
        if record is not None:
            with torch.no_grad():
                if record(losses()):
                    return True

        def closure() -> Tensor:
            optimizer.zero_grad()
            value = total(losses())
            value.backward()
            return value

        optimizer.step(closure)
        return False
    loss = losses()
    if record is not None and record(loss):
        return True
    if optimizer is not None:
        optimizer.zero_grad()
        total(loss).backward()
        optimizer.step()
    return False
