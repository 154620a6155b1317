"""Every setting of a GLMM analysis: the choices, their defaults, and one validated record of them.

The command line, the model classes and :class:`~splisosm.hyptest_glmm.SplisosmGLMM` take their
choices and defaults from here, so that each is written once. The module needs neither torch
nor the compiled extension (the command line's ``--help`` imports it alone).
"""

from __future__ import annotations

import re
import textwrap
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from numbers import Integral
from typing import Any

from splisosm._checks import check_bool, check_dict, check_int, check_keys, check_real
from splisosm._docs import fill_doc

__all__ = [
    "ModelType", "FittingMethod", "Optimizer", "Prior", "InitRatio", "Device", "Backend", "DUMethod",
    "SVMethod", "GLMMConfig", "APPROX_RANK_AUTO",
]


class _Choice(str, Enum):
    """A choice among named strings; members compare equal to their string values."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def check(cls, name: str, value: Any, allowed: tuple[str, ...] | None = None) -> str:
        """``value`` as a plain string, or ``ValueError`` naming ``name`` and the valid values."""
        allowed = cls.values() if allowed is None else allowed
        if isinstance(value, str) and value in allowed:
            return str(value)
        raise ValueError(f"Invalid {name} {value!r}; valid values are {', '.join(allowed)}.")


class ModelType(_Choice):
    """Random effect of the per-gene models."""

    FULL = "glmm-full"  # spatial random effect
    NULL = "glmm-null"  # white-noise random effect
    GLM = "glm"  # none


class FittingMethod(_Choice):
    """How a GLMM's parameters are fitted; the first is splisosm 1.2.0's default."""

    JOINT_GD = "joint_gd"
    JOINT_NEWTON = "joint_newton"
    MARGINAL_GD = "marginal_gd"
    MARGINAL_NEWTON = "marginal_newton"


class GLMFittingMethod(_Choice):
    """How a GLM (no random effect) is fitted."""

    IWLS = "iwls"
    NEWTON = "newton"
    GD = "gd"


class Optimizer(_Choice):
    ADAM = "adam"
    SGD = "sgd"
    LBFGS = "lbfgs"


class Prior(_Choice):
    """Prior on the total variance ``sigma``."""

    NONE = "none"
    GAMMA = "gamma"
    INV_GAMMA = "inv_gamma"


class InitRatio(_Choice):
    UNIFORM = "uniform"
    OBSERVED = "observed"


class Device(_Choice):
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


class Backend(_Choice):
    """Where the batches of a fit run: local worker processes, or the workers of a Dask cluster."""

    LOKY = "loky"
    DASK = "dask"


class DUMethod(_Choice):
    """Differential-usage tests; the first is the calibrated one recommended for new analyses."""

    MARGINAL_SCORE = "marginal-score"
    SCORE = "score"
    WALD = "wald"


class SVMethod(_Choice):
    """Spatial-variability tests; the first is calibrated after every fitting method."""

    SCORE = "score"
    LLR = "llr"


#: What the command line uses, and what the documentation recommends for new analyses: the
#: marginal fit puts the random effects at their mode, which the marginal score tests read.
RECOMMENDED_FIT = FittingMethod.MARGINAL_NEWTON.value
RECOMMENDED_DU = DUMethod.MARGINAL_SCORE.value
RECOMMENDED_SV = SVMethod.SCORE.value
#: Methods a white-noise (null) model can be fitted with.
NULL_METHODS = (FittingMethod.JOINT_GD.value, FittingMethod.MARGINAL_GD.value,
                FittingMethod.MARGINAL_NEWTON.value)

#: Prior parameters merged under the user's (the documented values of splisosm 1.2.0).
PRIOR_DEFAULTS: dict[str, dict[str, float]] = {
    Prior.NONE.value: {},
    Prior.GAMMA.value: {"alpha": 2.0, "beta": 0.3},
    Prior.INV_GAMMA.value: {"alpha": 3.0, "beta": 0.5},
}

#: Fitting settings of the per-gene models, then each method's changes to them.
FITTING_DEFAULTS: dict[str, Any] = {
    "lr": 1e-2,
    "optim": Optimizer.ADAM.value,
    "tol": 1e-5,
    "tol_relative": False,
    "max_epochs": 1000,
    "patience": 5,
}
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "joint_gd": {},
    "joint_newton": {"patience": 2},
    "marginal_gd": {"lr": 0.1},
    "marginal_newton": {"lr": 0.1, "patience": 10, "update_nu_every_k": 3},
    "iwls": {"patience": 2},
    "newton": {"patience": 2},
    "gd": {},
}
#: ``SplisosmGLMM``'s epochs per fit (splisosm 1.2.0's), merged under the user's fitting configs.
DEFAULT_MAX_EPOCHS = 500
#: What ``SplisosmGLMM`` merges the user's ``fitting_configs`` over.
FACADE_FITTING_CONFIGS: dict[str, Any] = {"max_epochs": DEFAULT_MAX_EPOCHS}
#: ``max_epochs = -1`` asks for the long run of splisosm 1.2.0.
UNLIMITED_EPOCHS = 10000
#: Permutations per gene of the spatial-variability test's permutation null.
DEFAULT_N_PERMS = 20
#: Keys of ``fitting_configs`` that are arguments of ``SplisosmGLMM.fit()`` instead.
_FIT_ARGUMENT_KEYS = ("with_design_mtx", "from_null", "refit_null", "batch_size")
#: Keys of ``fitting_configs`` that only the GLMM's gradient-descent methods read: the Newton
#: methods choose their own steps.
_DESCENT_KEYS = ("lr", "optim")
#: Keys accepted for splisosm 1.2.0 scripts and read by no method: ``marginal_newton`` moves the
#: random effects in every epoch, where 1.2.0 moved them every ``update_nu_every_k`` epochs.
_UNREAD_KEYS = ("update_nu_every_k",)
#: The starts of the warnings about settings without effect (matched where a model is re-created).
UNUSED_KEYS_WARNING = "fitting_configs key(s) without effect"
GLM_SETTINGS_WARNING = "model_type='glm' fits with its own Newton (IWLS) method"


class _AutoRank:
    """Sentinel for "approx_rank not given": the rank follows from the number of spots."""

    def __repr__(self) -> str:
        return "'auto'"

    def __reduce__(self) -> str:
        return "APPROX_RANK_AUTO"


APPROX_RANK_AUTO = _AutoRank()


def check_approx_rank(approx_rank: Any) -> Any:
    """``approx_rank`` as given when it is the auto sentinel or None, else as a positive int."""
    if approx_rank is APPROX_RANK_AUTO or approx_rank is None:
        return approx_rank
    if isinstance(approx_rank, bool) or not isinstance(approx_rank, Integral) or approx_rank < 1:
        raise ValueError(f"`approx_rank` must be omitted, None or a positive int, got {approx_rank!r}")
    return int(approx_rank)


def resolve_fitting_configs(method: str, user: dict | None) -> dict:
    """Base defaults, then the method's overrides, then the user's dict (user values win).

    Every key is checked: unknown keys (a misspelt ``max_epoch`` would otherwise be ignored),
    wrong types and out-of-range values raise ``ValueError`` naming the key. ``max_epochs``
    must be >= 1, or -1 for 10000; ``patience <= 0`` means 1.
    """
    user = check_dict("fitting_configs", user)
    hints = {k: f"{k!r} is an argument of SplisosmGLMM.fit(), not a fitting config"
             for k in _FIT_ARGUMENT_KEYS}
    known = {*FITTING_DEFAULTS, *(k for o in METHOD_OVERRIDES.values() for k in o)}
    check_keys("fitting_configs", user, known, hints)
    configs = {**FITTING_DEFAULTS, **METHOD_OVERRIDES[method], **user}
    configs["optim"] = Optimizer.check("optim", configs["optim"])
    configs["lr"] = check_real("fitting_configs['lr']", configs["lr"], low=0.0, low_open=True)
    configs["tol"] = check_real("fitting_configs['tol']", configs["tol"], low=0.0)
    configs["tol_relative"] = check_bool("fitting_configs['tol_relative']", configs["tol_relative"])
    epochs = check_int("fitting_configs['max_epochs']", configs["max_epochs"], minimum=1, also=(-1,))
    configs["max_epochs"] = UNLIMITED_EPOCHS if epochs == -1 else epochs
    configs["patience"] = max(check_int("fitting_configs['patience']", configs["patience"]), 1)
    if "update_nu_every_k" in configs:
        every = check_int("fitting_configs['update_nu_every_k']", configs["update_nu_every_k"])
        configs["update_nu_every_k"] = max(every, 1)
    return configs


def warn_unused_fitting_keys(method: str, user: dict | None, stacklevel: int) -> None:
    """Warn, naming them, about the keys of the user's ``fitting_configs`` that the GLMM fitting
    ``method`` does not read (``stacklevel`` as for :func:`warnings.warn`, plus this function)."""
    method = str(method)
    unused = [k for k in (user or {})
              if k in _UNREAD_KEYS or (k in _DESCENT_KEYS and not method.endswith("_gd"))]
    if not unused:
        return
    why = []
    if set(unused) & set(_DESCENT_KEYS):
        why.append("the Newton methods choose their own steps, without a learning rate or optimiser")
    if set(unused) & set(_UNREAD_KEYS):
        why.append("every method moves the random effects in every epoch (update_nu_every_k is "
                   "accepted so that splisosm 1.2.0 scripts run)")
    warnings.warn(f"{UNUSED_KEYS_WARNING} with fitting_method={method!r}: {unused}; {'; '.join(why)}.",
                  UserWarning, stacklevel=stacklevel + 1)


@contextmanager
def configs_announced() -> Iterator[None]:
    """Build models from settings that were warned about when they were given (a fit's per-gene
    models, conversions, clones and loads) without repeating the warnings about settings
    without effect."""
    with warnings.catch_warnings():
        for start in (UNUSED_KEYS_WARNING, GLM_SETTINGS_WARNING):
            warnings.filterwarnings("ignore", message=re.escape(start))
        yield


def resolve_prior_params(var_prior_model: str, params: dict | None) -> dict:
    """Merge user prior parameters over the documented defaults (``{}`` for ``'none'``).

    Both parameters of either prior are positive; unknown keys are refused, and parameters
    given with ``var_prior_model='none'`` draw a warning because nothing uses them.
    """
    var_prior_model = Prior.check("var_prior_model", var_prior_model)
    params = check_dict("var_prior_model_params", params)
    check_keys("var_prior_model_params", params,
               PRIOR_DEFAULTS.get(var_prior_model) or {k for p in PRIOR_DEFAULTS.values() for k in p})
    if var_prior_model == Prior.NONE:
        if params:
            warnings.warn(
                f"`var_prior_model_params` {params} is ignored with var_prior_model='none'; "
                "choose 'gamma' or 'inv_gamma' to use a prior.", UserWarning, stacklevel=3)
        return {}
    return {k: check_real(f"var_prior_model_params['{k}']", v, low=0.0, low_open=True)
            for k, v in {**PRIOR_DEFAULTS[var_prior_model], **params}.items()}


def validate_glmm_config(
    *,
    fitting_method: str = FittingMethod.JOINT_GD.value,
    init_ratio: str = InitRatio.UNIFORM.value,
    var_prior_model: str = Prior.NONE.value,
    var_fix_sigma: bool = True,
    fitting_configs: dict | None = None,
    null_model: bool = False,
) -> dict:
    """Validate a GLMM configuration and return the resolved fitting configs.

    Raises ``ValueError`` naming the valid values for an unknown ``fitting_method``,
    ``init_ratio``, ``var_prior_model`` or ``optim``, for ``joint_newton`` with
    ``var_fix_sigma=True`` and for ``joint_newton`` on a null model. Called by the per-gene
    models at construction and by :class:`GLMMConfig`.
    """
    FittingMethod.check("fitting_method", fitting_method, NULL_METHODS if null_model else None)
    InitRatio.check("init_ratio", init_ratio)
    Prior.check("var_prior_model", var_prior_model)
    if fitting_method == FittingMethod.JOINT_NEWTON and var_fix_sigma:
        others = ", ".join(m for m in FittingMethod.values() if m != FittingMethod.JOINT_NEWTON)
        raise ValueError(
            f"fitting_method='joint_newton' requires var_fix_sigma=False; valid methods with a "
            f"fixed sigma are {others}."
        )
    return resolve_fitting_configs(fitting_method, fitting_configs)


def _settings_doc() -> str:
    """The numpy-style ``Parameters`` entries of the settings, with the defaults defined above."""
    gamma, inv_gamma = PRIOR_DEFAULTS[Prior.GAMMA], PRIOR_DEFAULTS[Prior.INV_GAMMA]
    entries = {
        "model_type": "``'glmm-full'`` (spatial random effect), ``'glmm-null'`` (white-noise random "
                      "effect) or ``'glm'`` (no random effect).",
        "share_variance": "Share one variance component across the isoforms of a gene.",
        "var_fix_sigma": "Fix the total variance ``sigma`` at its Fano-factor initial estimate (only "
                         "the spatial proportion is learned); ``False`` learns it too.",
        "var_prior_model": f"Prior on ``sigma``: {', '.join(map(repr, Prior.values()))}.",
        "var_prior_model_params": f"Prior parameters merged over the defaults ``{gamma}`` (gamma) "
                                  f"and ``{inv_gamma}`` (inverse gamma).",
        "init_ratio": "``'uniform'`` or ``'observed'`` initial isoform ratios (``'observed'``: the "
                      "gene's pooled ratios, not each spot's own).",
        "fitting_method": f"{', '.join(map(repr, FittingMethod.values()))}; the first is splisosm "
                          "1.2.0's default, the last the recommended one.",
        "fitting_configs": f"Optional keys {', '.join(sorted({*FITTING_DEFAULTS, 'update_nu_every_k'}))} "
                           f"(``optim``: {', '.join(map(repr, Optimizer.values()))}), merged over "
                           f"``{FACADE_FITTING_CONFIGS}``; the user's dict is copied, "
                           "never changed. ``max_epochs=-1`` runs splisosm 1.2.0's long fit. Keys the "
                           "fitting method does not read (``lr`` and ``optim`` with a Newton method, "
                           "``update_nu_every_k`` with any) draw a warning.",
        "k_neighbors": "Neighbours of the k-NN graph of the spatial kernel (ignored with ``adj_key``).",
        "rho": "Spatial autocorrelation of the CAR kernel, ``0 <= rho < 1``.",
        "approx_rank": "Omit for auto (full rank up to 5000 spots, ``ceil(4 sqrt(n))`` above), an "
                       "int for a fixed low rank, or None for the exact kernel at any size (above "
                       "5000 spots through its sparse precision, with a ``UserWarning``).",
        "device": f"{', '.join(map(repr, Device.values()))}.",
    }
    return "\n".join(f"{name}\n" + "\n".join(textwrap.wrap(text, 92, initial_indent=" " * 4,
                                                             subsequent_indent=" " * 4))
                     for name, text in entries.items())


#: The settings' entries for the ``Parameters`` section of a docstring.
SETTINGS_DOC = _settings_doc()


@fill_doc(settings=SETTINGS_DOC)
@dataclass(frozen=True)
class GLMMConfig:
    """The settings of a :class:`~splisosm.hyptest_glmm.SplisosmGLMM`, validated once.

    Construction checks every value and raises ``ValueError`` naming the setting at fault; the
    stored values are plain Python values (strings for the choices), with the prior parameters
    and ``fitting_configs`` merged over their defaults.

    Parameters
    ----------
    {settings}
    """

    model_type: str = ModelType.FULL.value
    share_variance: bool = True
    var_fix_sigma: bool = True
    var_prior_model: str = Prior.NONE.value
    var_prior_model_params: dict | None = None
    init_ratio: str = InitRatio.UNIFORM.value
    fitting_method: str = FittingMethod.JOINT_GD.value
    fitting_configs: dict | None = None
    k_neighbors: int = 4
    rho: float = 0.99
    approx_rank: Any = field(default=APPROX_RANK_AUTO)
    device: str = Device.CPU.value

    def __post_init__(self) -> None:
        model_type = ModelType.check("model_type", self.model_type)
        values = {
            "model_type": model_type,
            "share_variance": check_bool("share_variance", self.share_variance),
            "var_fix_sigma": check_bool("var_fix_sigma", self.var_fix_sigma),
            "var_prior_model_params": resolve_prior_params(self.var_prior_model,
                                                           self.var_prior_model_params),
            "fitting_configs": {**FACADE_FITTING_CONFIGS,
                                **check_dict("fitting_configs", self.fitting_configs)},
            "k_neighbors": check_int("k_neighbors", self.k_neighbors, minimum=1),
            "rho": check_real("rho", self.rho, low=0.0, high=1.0, high_open=True),
            "approx_rank": check_approx_rank(self.approx_rank),
            "device": Device.check("device", self.device),
        }
        if model_type != ModelType.GLM:
            validate_glmm_config(
                fitting_method=self.fitting_method, init_ratio=self.init_ratio,
                var_prior_model=self.var_prior_model, var_fix_sigma=values["var_fix_sigma"],
                fitting_configs=values["fitting_configs"], null_model=model_type == ModelType.NULL,
            )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def warn_unused(self, stacklevel: int = 2) -> None:
        """Warn about settings given without effect: ``fitting_method`` and ``fitting_configs`` of a
        ``'glm'`` model, or keys of ``fitting_configs`` that the fitting method does not read
        (``stacklevel`` as for :func:`warnings.warn`, counted from the caller of this method)."""
        if self.model_type != ModelType.GLM:
            warn_unused_fitting_keys(self.fitting_method, self.fitting_configs, stacklevel + 1)
        elif (self.fitting_method != GLMMConfig.fitting_method
              or self.fitting_configs != FACADE_FITTING_CONFIGS):
            warnings.warn(f"{GLM_SETTINGS_WARNING}; `fitting_method` and `fitting_configs` are ignored.",
                          UserWarning, stacklevel=stacklevel + 1)

    def describe(self) -> list[str]:
        """The settings as lines of the text report of ``str(SplisosmGLMM)``."""
        lines = [f"Model: {self.model_type}"]
        if self.model_type == ModelType.FULL:
            lines.append(f"  k_neighbors: {self.k_neighbors}   rho: {self.rho}")
        if self.model_type != ModelType.GLM:
            lines += [f"  learnable variance: {not self.var_fix_sigma}   shared variance: {self.share_variance}",
                      f"  variance prior: {self.var_prior_model}   init: {self.init_ratio}"]
        return lines

    def model_configs(self) -> dict[str, Any]:
        """The settings the per-gene models take (a fresh dict)."""
        return {
            "share_variance": self.share_variance,
            "var_fix_sigma": self.var_fix_sigma,
            "var_prior_model": self.var_prior_model,
            "var_prior_model_params": dict(self.var_prior_model_params),
            "init_ratio": self.init_ratio,
            "fitting_method": self.fitting_method,
            "fitting_configs": dict(self.fitting_configs),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible settings (``approx_rank`` omitted stands as ``'auto'``)."""
        out = asdict(self)
        out["approx_rank"] = "auto" if self.approx_rank is APPROX_RANK_AUTO else self.approx_rank
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GLMMConfig:
        """The config :meth:`to_dict` wrote."""
        values = dict(values)
        if values.get("approx_rank") == "auto":
            values["approx_rank"] = APPROX_RANK_AUTO
        return cls(**values)

