"""Fitting of gene batches and rebuilding of per-gene models from stored states.

Everything here is free of the ``SplisosmGLMM`` object so that the batch function can run in
joblib worker processes with a small payload: one batch of counts, the design (when used), the
kernel arrays (numpy, memory-mapped by joblib when large) and a plain configuration record.
Workers return :class:`GeneState` rows only — parameters plus the training log of each gene —
so the training log survives batching and parallelism (splisosm 1.2.0 lost it there).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from joblib import Parallel, delayed
from tqdm.auto import tqdm

from splisosm.config import Backend, ModelType, resolve_fitting_configs
from splisosm.glmm._fitting import NOT_CONVERGED
from splisosm.glmm.glm import MultinomGLM
from splisosm.glmm.isomodels import IsoFullModel, IsoNullNoSpVar
from splisosm.glmm.model import fit_together, recreate_model
from splisosm.ops.engine import engine_runs
from splisosm.spatial._build import KernelPayload

GLMM_PARAMS = ("nu", "beta", "bias_eta", "sigma", "theta_logit")
GLM_PARAMS = ("beta", "bias_eta")
NULL_KEY, FULL_KEY, GLM_KEY = ModelType.NULL.value, ModelType.FULL.value, ModelType.GLM.value


@dataclass
class GeneState:
    """Fitted parameters and training log of one gene.

    Attributes
    ----------
    params
        Parameter name -> CPU tensor with a leading gene axis of size 1.
    converged, best_loss, best_epoch
        The gene's row of the model's training logger (``best_loss`` is the best objective,
        negated, i.e. a negative log-likelihood).
    fitting_time
        Seconds of the batch's fitting loop attributed to this gene (batch time / batch size).
    n_isos
        Number of isoforms.
    """

    params: dict[str, torch.Tensor]
    converged: bool
    best_loss: float
    best_epoch: int
    fitting_time: float
    n_isos: int


@dataclass(frozen=True)
class FitPlan:
    """What to fit for each batch.

    Attributes
    ----------
    model_type
        'glmm-full', 'glmm-null' or 'glm'.
    model_kwargs
        Constructor keywords of the per-gene GLMMs (a private copy of the user's configuration).
    from_null, refit_null
        Fit the white-noise null first and start the spatial fit from it; then refit each
        from the other where that improves it.
    quiet
        Passed to the per-gene ``fit``.
    device
        Torch device of the per-gene models.
    """

    model_type: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    from_null: bool = False
    refit_null: bool = True
    quiet: bool = True
    device: str = "cpu"


#: Memory the native engine may use for one group of genes fitted together on the CPU (bytes).
ENGINE_GROUP_BYTES = 1 << 30
#: Share of a GPU's free memory the native engine may use for one group of genes.
ENGINE_GPU_MEMORY_SHARE = 0.25


def engine_group_bytes(device: torch.device) -> int:
    """Working memory for one engine call on ``device``: :data:`ENGINE_GROUP_BYTES` on the CPU;
    on a GPU, where one call over many genes keeps the device busy, a share of its free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(ENGINE_GROUP_BYTES, int(free * ENGINE_GPU_MEMORY_SHARE))
    return ENGINE_GROUP_BYTES


def engine_group_size(plan: FitPlan, kernel: KernelPayload | None, n_spots: int,
                      max_isos: int) -> int:
    """How many genes of one isoform count the native ``joint_gd`` engine may fit in one call.

    The engine's result for a gene does not depend on the other genes of its call, and one call
    reads the kernel's eigenvectors once per epoch for all of them, so larger groups are faster.
    Returns 1 when the engine does not run this plan (another method or optimiser, a kernel
    without eigenpairs, a device without the compiled op); otherwise as many genes as fit in
    :func:`engine_group_bytes` of per-gene working memory.
    """

    if plan.model_type == GLM_KEY:  # the GLM has fitters of its own
        return 1
    method = plan.model_kwargs.get("fitting_method", "joint_gd")
    configs = resolve_fitting_configs(method, plan.model_kwargs.get("fitting_configs"))
    # a null model needs no eigenpairs; a full model (also the second stage of from_null) does
    needs_pairs = plan.model_type == FULL_KEY or plan.from_null
    has_pairs = not needs_pairs or (kernel is not None and kernel.eigvecs is not None)
    device = torch.device(plan.device)
    if not engine_runs(method, configs["optim"], has_pairs, device):
        return 1
    q = max_isos - 1
    # parameters, gradients, two moments and the best snapshot; eta, its gradient and curvature;
    # the transposed random effects and their prior product (float32); the loss history (float64)
    per_gene = 4 * n_spots * (q * (9 + q) + max_isos) + 8 * int(configs["max_epochs"])
    return max(1, engine_group_bytes(device) // per_gene)


def new_model(kind: str, model_kwargs: dict[str, Any]):
    """Construct an unfitted per-gene model of the given kind."""

    if kind == GLM_KEY:
        # the GLM always fits with its own (IWLS) defaults
        return MultinomGLM()
    cls = IsoFullModel if kind == FULL_KEY else IsoNullNoSpVar
    return recreate_model(cls, {k: _copy_config(v) for k, v in model_kwargs.items()})


def _copy_config(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value


def setup_model(model, kind: str, counts: torch.Tensor, design: torch.Tensor | None,
                kernel: KernelPayload, device: str) -> None:
    """Attach a batch of counts ``(G, n, m)``, the optional design and the kernel to ``model``."""
    if kind == GLM_KEY:
        model.setup_data(counts, design_mtx=design, device=device)
    else:
        model.setup_data(counts, design_mtx=design, device=device, **kernel.setup_kwargs(device))


def _logger_rows(model, G: int) -> list[dict[str, Any]]:
    """Per gene of a fitted batch model: ``converged``, ``best_loss``, ``best_epoch``."""
    if model.logger is None:  # set up, never fitted
        return [{"converged": False, "best_loss": math.nan, "best_epoch": 0}] * G
    return model.logger.summary_rows()


def states_from_model(model, kind: str) -> list[GeneState]:
    """Split a fitted batch model into per-gene states (CPU copies)."""
    names = GLM_PARAMS if kind == GLM_KEY else GLMM_PARAMS
    params = {n: getattr(model, n).detach().cpu() for n in names}
    G = params["bias_eta"].shape[0]
    m = params["bias_eta"].shape[1] + 1
    share = float(model.fitting_time) / G  # the batch's wall time, split evenly
    return [
        GeneState(params={n: p[g : g + 1].clone() for n, p in params.items()},
                  fitting_time=share, n_isos=m, **row)
        for g, row in enumerate(_logger_rows(model, G))
    ]


def _objective(model) -> torch.Tensor:
    with torch.no_grad():
        return model.forward().detach().cpu().reshape(-1)


def _pick(first: list[GeneState], second: list[GeneState], take_second: torch.Tensor) -> list[GeneState]:
    return [b if bool(t) else a for a, b, t in zip(first, second, take_second)]


def stack_params(states: Sequence[GeneState]) -> dict[str, torch.Tensor]:
    """Concatenate per-gene parameters along the gene axis."""
    return {n: torch.cat([s.params[n] for s in states], dim=0) for n in states[0].params}


def fit_batch(plan: FitPlan, counts: Sequence[np.ndarray], design: np.ndarray | None,
              kernel: KernelPayload, random_seed: int | None) -> dict[str, list[GeneState]]:
    """Fit one batch of genes and return per-gene states by model key, in batch order.

    ``counts`` holds the batch's genes as consecutive parts of equal isoform count, one
    ``(G_i, n, m_i)`` array each; the parts' models are fitted together (one native engine call
    where the engine runs them, see :func:`splisosm.glmm.model.fit_together`).

    De novo fits return states under ``plan.model_type``. From-null fits return both
    ``'glmm-null'`` and ``'glmm-full'`` states; the ``refit_null`` choices are made per gene
    (the reference compared batch means).
    """

    parts = [torch.as_tensor(np.asarray(c, dtype=np.float32)) for c in counts]
    X = None if design is None else torch.as_tensor(np.asarray(design, dtype=np.float32))

    def fitted(models: list) -> list:
        with warnings.catch_warnings():
            # SplisosmGLMM.fit counts the genes that did not converge over all batches.
            warnings.filterwarnings("ignore", message=f".*{re.escape(NOT_CONVERGED)}")
            fit_together(models, quiet=plan.quiet, random_seed=random_seed)
        return models

    def set_up(kind: str) -> list:
        models = [new_model(kind, plan.model_kwargs) for _ in parts]
        for model, Y in zip(models, parts):
            setup_model(model, kind, Y, X, kernel, plan.device)
        return models

    def flat(per_part: list[list[GeneState]]) -> list[GeneState]:
        return [state for states in per_part for state in states]

    if not plan.from_null:
        models = fitted(set_up(plan.model_type))
        return {plan.model_type: flat([states_from_model(m, plan.model_type) for m in models])}

    nulls = fitted(set_up(NULL_KEY))
    fulls = fitted([IsoFullModel.from_trained_null(null) for null in nulls])
    null_states = [states_from_model(null, NULL_KEY) for null in nulls]
    full_states = [states_from_model(full, FULL_KEY) for full in fulls]
    if plan.refit_null:
        null2s = fitted([IsoNullNoSpVar.from_trained_full(full) for full in fulls])
        # (part, genes to retry, their full objective, null model of just them to restart from)
        retries = []
        for i, (null, null2, full) in enumerate(zip(nulls, null2s, fulls)):
            f_null, f_null2 = _objective(null), _objective(null2)
            better_null = f_null2 > f_null
            null_states[i] = _pick(null_states[i], states_from_model(null2, NULL_KEY), better_null)
            f_full = _objective(full)
            genes = torch.nonzero(torch.where(better_null, f_null2, f_null) > f_full).flatten()
            if genes.numel():
                # only these genes are fitted again (a gene's fit does not depend on its
                # batch-mates, and retries are usually a few genes of a part)
                base = new_model(NULL_KEY, plan.model_kwargs)
                setup_model(base, NULL_KEY, parts[i][genes], X, kernel, plan.device)
                base.update_params_from_dict(stack_params([null_states[i][g] for g in genes]))
                retries.append((i, genes.tolist(), f_full[genes], base))
        full2s = fitted([IsoFullModel.from_trained_null(base) for *_, base in retries])
        for (i, genes, f_full, _), full2 in zip(retries, full2s):
            better = (_objective(full2) > f_full).tolist()
            for g, state, take in zip(genes, states_from_model(full2, FULL_KEY), better):
                if take:
                    full_states[i][g] = state
    return {NULL_KEY: flat(null_states), FULL_KEY: flat(full_states)}


def run_batches(
    plan: FitPlan,
    gene_counts: Sequence[torch.Tensor],
    design: torch.Tensor | None,
    kernel: KernelPayload,
    batches: Sequence[Sequence[int]],
    *,
    n_jobs: int = 1,
    random_seed: int | None = None,
    progress: bool = False,
    desc: str = "Fitting",
    backend: str = Backend.LOKY.value,
) -> dict[str, list[GeneState]]:
    """Fit all batches (in this process, worker processes or on a Dask cluster); states in gene order.

    Results are placed by gene index, never by display name, so grouped fits always map back
    to the original gene order and duplicate names keep their own parameters. With
    ``backend='dask'`` the batches run on the workers of the current ``dask.distributed``
    client; the kernel and the design go to each worker once, each task carries only the counts
    of its batch.
    """
    design_np = None if design is None else design.detach().cpu().numpy()

    def payload(batch: Sequence[int]) -> list[np.ndarray]:
        # consecutive runs of equal isoform count, one array each
        parts: list[list[int]] = []
        for g in batch:
            if parts and gene_counts[parts[-1][0]].shape[1] == gene_counts[g].shape[1]:
                parts[-1].append(g)
            else:
                parts.append([g])
        return [torch.stack([gene_counts[g] for g in part]).numpy() for part in parts]

    seeds = _batch_seeds(random_seed, len(batches))
    bar = tqdm(total=len(batches), desc=desc, disable=not progress, unit="batch")
    if backend == Backend.DASK:
        results: Iterable = _dask_results(plan, [payload(b) for b in batches], design_np, kernel, seeds)
    else:
        jobs = ((plan, payload(batch), design_np, kernel, seed) for batch, seed in zip(batches, seeds))
        if n_jobs == 1:
            results = (fit_batch(*job) for job in jobs)
        else:
            results = Parallel(n_jobs=n_jobs, return_as="generator")(delayed(fit_batch)(*job) for job in jobs)
    n_genes = len(gene_counts)
    out: dict[str, list[GeneState | None]] = {}
    with bar:
        for batch, result in zip(batches, results):
            for key, states in result.items():
                if len(states) != len(batch):
                    raise RuntimeError(
                        f"batch of {len(batch)} genes returned {len(states)} fitted states"
                    )
                slot = out.setdefault(key, [None] * n_genes)
                for g, state in zip(batch, states):
                    if state.n_isos != gene_counts[g].shape[1]:
                        raise RuntimeError(
                            f"gene {g}: fitted {state.n_isos} isoforms but the data has "
                            f"{gene_counts[g].shape[1]}"
                        )
                    slot[g] = state
            bar.update(1)
    return {key: list(states) for key, states in out.items()}  # type: ignore[arg-type]


def _dask_results(plan: FitPlan, payloads: list[list[np.ndarray]], design: np.ndarray | None,
                  kernel: KernelPayload | None, seeds: list[int | None]) -> Iterable:
    """The batches' results, in order, from the workers of the current Dask client."""
    try:
        from distributed import get_client
    except ImportError as err:
        raise ImportError("backend='dask' needs dask.distributed: pip install 'splisosm[dask]'") from err
    try:
        client = get_client()
    except ValueError as err:
        raise ValueError("backend='dask' fits on the workers of a dask.distributed Client; create one "
                         "first, e.g. `from dask.distributed import Client; client = Client(...)`") from err
    # the kernel (up to n x rank floats) and the design go to every worker once
    shared = client.scatter([kernel, design], broadcast=True)
    futures = [client.submit(fit_batch, plan, counts, shared[1], shared[0], seed, pure=False)
               for counts, seed in zip(payloads, seeds)]
    return (future.result() for future in futures)


def _batch_seeds(random_seed: int | None, n: int) -> list[int | None]:
    """One seed per batch, derived from ``random_seed`` so parallel and serial runs agree."""
    if random_seed is None:
        return [None] * n
    return [int(s) for s in np.random.SeedSequence(random_seed).generate_state(n)]


def rebuild_models(
    kind: str,
    model_kwargs: dict[str, Any],
    states: Sequence[GeneState],
    counts: torch.Tensor,
    design: torch.Tensor | None,
    kernel: KernelPayload,
    device: str,
):
    """A batch model for ``counts (G, n, m)`` carrying the stored parameters of its genes."""
    model = new_model(kind, model_kwargs)
    with warnings.catch_warnings():
        # Set-up warnings (e.g. the marginal-method cost note) were already shown during fit.
        warnings.simplefilter("ignore", UserWarning)
        setup_model(model, kind, counts, design, kernel, device)
    params = stack_params(states)
    expected = {n: tuple(getattr(model, n).shape) for n in params}
    for name, value in params.items():
        if tuple(value.shape) != expected[name]:
            raise RuntimeError(
                f"stored parameter {name!r} has shape {tuple(value.shape)} but the rebuilt model "
                f"expects {expected[name]}"
            )
    model.update_params_from_dict({n: p.to(device) for n, p in params.items()})
    return model


def evaluate_groups(
    groups: Sequence[Sequence[int]],
    fn: Callable[[list[int]], torch.Tensor],
    n_genes: int,
    progress: bool = False,
    desc: str = "",
) -> list[torch.Tensor]:
    """Apply ``fn`` to each group of gene indices and scatter its per-gene rows to gene order."""
    out: list[torch.Tensor | None] = [None] * n_genes
    for group in tqdm(groups, desc=desc, disable=not progress, unit="batch"):
        rows = fn(list(group))
        for g, row in zip(group, rows):
            out[g] = row
    return out  # type: ignore[return-value]


__all__ = [
    "ENGINE_GROUP_BYTES",
    "engine_group_bytes",
    "FitPlan",
    "GeneState",
    "KernelPayload",
    "engine_group_size",
    "evaluate_groups",
    "fit_batch",
    "rebuild_models",
    "run_batches",
    "states_from_model",
]
