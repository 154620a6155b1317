"""Newton machinery for the GLMM: the mode of ``(nu, beta, bias)`` by structured Schur-complement
Newton steps, a correct ``joint_newton`` and a Laplace-marginal ``marginal_newton``.

Everything is batched over genes in lockstep; per-gene step sizes come from step halving on the
method's objective, so a gene never accepts a step that lowers it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from splisosm.glmm._likelihood import gaussian_loglik, log_prior, variance_components
from splisosm.ops import multinom_terms

MAX_HALVINGS = 10
THETA_LOGIT_BOUND = 10.0
MAX_VARIANCE_STEP = 3.0
# Relative step of the central differences of the variance Hessian (sparse-precision prior):
# about the cube root of float64 round-off, which balances truncation and cancellation.
FD_STEP = 1e-5


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    return t.view(-1, *([1] * (x.dim() - 1)))


def step_halving(f0: Tensor, evaluate: Callable[[Tensor], Tensor]) -> Tensor:
    """Per-gene step lengths ``t in {1, 1/2, ...}`` with ``evaluate(t) >= f0`` (0 if none)."""
    t = torch.ones_like(f0)
    accepted = torch.zeros_like(f0, dtype=torch.bool)
    for _ in range(MAX_HALVINGS):
        f = evaluate(t)
        accepted = accepted | (torch.isfinite(f) & (f >= f0))
        if bool(accepted.all()):
            break
        t = torch.where(accepted, t, 0.5 * t)
    return torch.where(accepted, t, torch.zeros_like(t))


class _ModeSolver:
    """Objective pieces and Newton directions for one model's random and fixed effects."""

    # Newton work runs in float64 whatever the parameter dtype: the curvature blocks of spots
    # with extreme probabilities must stay positive semi-definite, and the mode converges
    # below float32 round-off.
    WORK = torch.float64

    def __init__(self, model) -> None:
        self.model = model
        X = model.X.to(self.WORK)
        self.Xt = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)], 1)
        self.counts = model.counts.to(self.WORK)
        self.P1 = self.Xt.shape[1]
        self.q = model.n_isos - 1

    def for_genes(self, genes: Tensor) -> _ModeSolver:
        """The same solver restricted to the given genes of the batch (index tensor)."""
        sub = copy.copy(self)
        sub.counts = self.counts[genes]
        return sub

    def state(self) -> tuple[Tensor, Tensor]:
        """Current ``nu`` and fixed effects ``omega`` ``(G, q, P + 1)`` (intercept last)."""
        m = self.model
        omega = torch.cat([m.beta.detach().transpose(1, 2), m.bias_eta.detach()[..., None]], -1)
        return m.nu.detach().to(self.WORK, copy=True), omega.to(self.WORK)

    def write(self, nu: Tensor, omega: Tensor) -> None:
        m = self.model
        m.nu.copy_(nu)
        m.beta.copy_(omega[..., :-1].transpose(1, 2))
        m.bias_eta.copy_(omega[..., -1])

    def joint(self, nu: Tensor, omega: Tensor, sigma: Tensor, theta_logit: Tensor) -> dict:
        """``l_J`` and its multinomial/Gaussian pieces at the given parameters."""
        m = self.model
        eta = nu + torch.einsum("sf,gjf->gsj", self.Xt, omega)
        l_mult, grad, W = multinom_terms(eta, self.counts)
        v, theta = variance_components(sigma.to(self.WORK), theta_logit.to(self.WORK), self.q)
        quad, logdet_sigma, prec_nu = m.system.prior_terms(nu, v, theta)
        value = (l_mult + gaussian_loglik(quad, logdet_sigma, m.n_spots, self.q)
                 + log_prior(sigma.to(self.WORK), m.var_prior_model, m.var_prior_model_params))
        return {"value": value, "grad": grad, "W": W, "prec_nu": prec_nu, "v": v,
                "theta": theta}

    def marginal(self, parts: dict) -> Tensor:
        """Laplace marginal ``l_J - 1/2 log det(Sigma^-1 + W)`` from :meth:`joint` pieces."""
        return parts["value"] - 0.5 * self.model.system.logdet(parts["W"], parts["v"],
                                                               parts["theta"])

    def direction(self, parts: dict) -> tuple[Tensor, Tensor]:
        """Full Newton direction for ``(nu, omega)`` by a Schur complement on ``omega``.

        ``H_nn = Sigma^-1 + W`` is solved once with ``1 + q (P + 1)`` right-hand sides: the
        gradient and the columns of the coupling ``H_n,omega = W X~``.
        """
        W, grad = parts["W"], parts["grad"]
        G, n, q, _ = W.shape
        g_nu = grad - parts["prec_nu"]
        g_om = torch.einsum("sf,gsj->gjf", self.Xt, grad)
        # coupling columns, one per (k, f): entry (s, j) = W_s[j, k] x~_sf
        cross = torch.einsum("gsjk,sf->gkfsj", W, self.Xt).reshape(G, q * self.P1, n, q)
        rhs = torch.cat([g_nu[:, None], cross], dim=1)
        sol = self.model.system.solve(W, rhs, parts["v"], parts["theta"])
        x0, X1 = sol[:, 0], sol[:, 1:]
        info = torch.einsum("sf,gsjk,sh->gjfkh", self.Xt, W, self.Xt).reshape(
            G, q * self.P1, q * self.P1)
        schur = info - torch.einsum("grsj,gcsj->grc", cross, X1)
        rhs_om = g_om.reshape(G, -1) - torch.einsum("grsj,gsj->gr", cross, x0)
        eye = torch.eye(schur.shape[-1], dtype=W.dtype, device=W.device)
        d_om = torch.linalg.solve(schur + 1e-8 * eye, rhs_om)
        d_nu = x0 - torch.einsum("grsj,gr->gsj", X1, d_om)
        return d_nu, d_om.reshape(G, q, self.P1)

    def refine(self, nu: Tensor, omega: Tensor, sigma: Tensor, theta_logit: Tensor,
               steps: int, halving: bool) -> tuple[Tensor, Tensor, dict]:
        """``steps`` Newton steps towards the mode of ``l_J`` given the variance parameters."""
        parts = self.joint(nu, omega, sigma, theta_logit)
        for _ in range(steps):
            d_nu, d_om = self.direction(parts)
            last: dict = {}

            def at(t: Tensor) -> Tensor:
                last["t"] = t
                last["parts"] = self.joint(nu + _bcast(t, nu) * d_nu,
                                           omega + _bcast(t, omega) * d_om, sigma, theta_logit)
                return last["parts"]["value"]

            if halving:
                t = step_halving(parts["value"], at)
            else:
                t = torch.ones_like(parts["value"])
                at(t)
            nu = nu + _bcast(t, nu) * d_nu
            omega = omega + _bcast(t, omega) * d_om
            # the last evaluation is the new point unless some gene rejected every step length
            reuse = last["t"] is t or bool((last["t"] == t).all())
            parts = last["parts"] if reuse else self.joint(nu, omega, sigma, theta_logit)
        return nu, omega, parts


class JointNewton:
    """Correct Newton on the joint likelihood.

    splisosm 1.2.0's ``joint_newton`` diverges: its fixed-effect step has the wrong sign, its
    variance step uses a Hessian in which ``sigma`` enters linearly although the likelihood uses
    ``sigma^2``, and its steps use the gradient of the batch-mean loss with the per-gene Hessian
    (so they shrink as ``1/G``). This one avoids all three.

    Per epoch: one damped Newton step on ``(nu, beta, bias)`` jointly, then one Newton step on
    each gene's variance parameters ``(sigma, theta_logit)`` using the exact Hessian of the
    parametrisation used by the likelihood (``v = max(sigma^2, 0.01)``), by autograd (central
    differences of the exact gradient for a sparse precision without eigenpairs). Indefinite
    variance Hessians are made positive by taking absolute eigenvalues; steps are per gene (not
    divided by ``G``) and halved until the joint objective does not decrease.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.solver = _ModeSolver(model)

    def _variance_objective(self, nu: Tensor, sigma: Tensor, theta_logit: Tensor) -> Tensor:
        m = self.model
        q = m.n_isos - 1
        v, theta = variance_components(sigma, theta_logit, q, warn=False)
        quad, logdet_sigma, _ = m.system.prior_terms(nu, v, theta)
        return (gaussian_loglik(quad, logdet_sigma, m.n_spots, q)
                + log_prior(sigma, m.var_prior_model, m.var_prior_model_params))

    def _variance_derivatives(self, nu: Tensor, psi: Tensor, C: int
                              ) -> tuple[Tensor, Tensor, Tensor]:
        """Objective, gradient and Hessian in ``psi = (sigma, theta_logit)`` per gene.

        The Hessian comes from autograd, except with a sparse precision alone, whose prior terms
        have first derivatives only: there it is the central difference of the exact gradient.
        """
        exact = self.model.corr_sp_eigvecs is not None

        def value_and_grad(at: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            x = at.detach().requires_grad_(True)
            with torch.enable_grad():
                f = self._variance_objective(nu, x[:, :C], x[:, C:])
                (g,) = torch.autograd.grad(f.sum(), x, create_graph=exact)
            return f, g, x

        f, g, x = value_and_grad(psi)
        if exact:
            rows = [torch.autograd.grad(g[:, k].sum(), x, retain_graph=True)[0]
                    for k in range(2 * C)]
        else:
            h = FD_STEP * psi.abs().clamp(min=1.0)
            rows = []
            for k in range(2 * C):
                e = torch.zeros_like(psi)
                e[:, k] = h[:, k]
                diff = value_and_grad(psi + e)[1] - value_and_grad(psi - e)[1]
                rows.append(diff / (2 * h[:, k:k + 1]))
        return f.detach(), g.detach(), torch.stack(rows, dim=1).detach()

    def step(self, epoch: int, active: Tensor) -> None:
        m, s = self.model, self.solver
        with torch.no_grad():
            nu, omega = s.state()
            sigma, tl = m.sigma.detach(), m.theta_logit.detach()
            nu, omega, _ = s.refine(nu, omega, sigma, tl, steps=1, halving=True)
            s.write(nu, omega)
        psi = torch.cat([sigma, tl], dim=-1).to(s.WORK, copy=True)
        C = sigma.shape[-1]
        f, g, H = self._variance_derivatives(nu, psi, C)
        with torch.no_grad():
            evals, evecs = torch.linalg.eigh(-(H + H.transpose(1, 2)) / 2)
            inv = 1.0 / evals.abs().clamp(min=1e-4)
            direction = torch.einsum("gab,gb,gcb,gc->ga", evecs, inv, evecs, g)
            norm = direction.norm(dim=-1, keepdim=True)
            direction = direction * (MAX_VARIANCE_STEP / norm.clamp(min=MAX_VARIANCE_STEP))

            def at(t: Tensor) -> Tensor:
                new = psi + t[:, None] * direction
                return self._variance_objective(nu, new[:, :C], new[:, C:])

            t = step_halving(f, at)
            new = psi + t[:, None] * direction
            m.sigma.copy_(new[:, :C])
            m.theta_logit.copy_(new[:, C:].clamp(-THETA_LOGIT_BOUND, THETA_LOGIT_BOUND))


class MarginalNewton:
    """Laplace-marginal fitting: Newton to the mode, profile steps on the variance parameters.

    Per epoch: one damped Newton step of ``(nu, beta, bias)`` towards the mode of ``l_J`` at
    the current variance parameters; then, for each trainable variance coordinate
    (``theta_logit`` components, then ``sigma`` components when learnable), the profile
    ``p(psi) = l_M(mode(psi), psi)`` is evaluated at ``psi +- h`` (each mode warm-started from
    the current one and refined by one Newton step, which leaves an ``O(h^2)`` mode error), a
    quadratic through the three values proposes a step, and each gene keeps the best of the
    four points. ``l_M`` uses the structured log-determinant, so a variance coordinate costs six
    factorisations of the Laplace system per epoch, plus two for the mode step, which is skipped
    for genes that have just moved (their state was then refined as a candidate). Genes are
    independent, so a gene that has not moved its variance parameters for two epochs in a row is
    at a fixed point and drops out of later epochs' work: a batch no longer runs every gene
    until its slowest one settles, and the patience epochs cost nothing. Moves gaining less than
    the fitting ``tol`` are not taken. ``update_nu_every_k`` (a setting of the reference's optimiser-based
    method) is accepted but unused: the mode is refined in every epoch.
    """

    SETTLE_EPOCHS = 2

    def __init__(self, model) -> None:
        self.model = model
        self.solver = _ModeSolver(model)
        genes = model.n_genes
        device = model.nu.device
        self.still = torch.zeros(genes, dtype=torch.long, device=device)  # epochs without a move
        self.moved = torch.zeros(genes, dtype=torch.bool, device=device)  # in the last epoch
        self.objective: Tensor | None = None

    def _threshold(self, f: Tensor) -> Tensor:
        configs = self.model.fitting_configs
        tol = float(configs["tol"])
        if configs.get("tol_relative", False):
            return tol * f.abs().clamp(min=1.0)
        return torch.full_like(f, tol)

    def _coordinates(self) -> list[tuple[str, int]]:
        m = self.model
        coords = []
        if m.theta_logit.requires_grad:
            coords += [("theta_logit", c) for c in range(m.theta_logit.shape[-1])]
        if m.sigma.requires_grad:
            coords += [("sigma", c) for c in range(m.sigma.shape[-1])]
        return coords

    @staticmethod
    def _profile(solver: _ModeSolver, nu, omega, psi: dict) -> tuple[Tensor, Tensor, Tensor]:
        nu, omega, parts = solver.refine(nu, omega, psi["sigma"], psi["theta_logit"],
                                         steps=1, halving=False)
        return nu, omega, solver.marginal(parts)

    def step(self, epoch: int, active: Tensor) -> None:
        working = self.still < self.SETTLE_EPOCHS
        if not bool(working.any()):
            return  # every gene at its fixed point: the patience counter runs
        m = self.model
        with torch.no_grad():
            nu, omega = self.solver.state()
            psi = {"sigma": m.sigma.detach().to(_ModeSolver.WORK, copy=True),
                   "theta_logit": m.theta_logit.detach().to(_ModeSolver.WORK, copy=True)}
            genes = torch.nonzero(working).flatten()
            solver = self.solver if bool(working.all()) else self.solver.for_genes(genes)
            nu_w, omega_w = nu[genes], omega[genes]
            psi_w = {key: value[genes] for key, value in psi.items()}
            # genes that just moved were refined (and evaluated) as profile candidates
            if self.objective is None or not bool(self.moved[genes].all()):
                nu_w, omega_w, parts = solver.refine(nu_w, omega_w, psi_w["sigma"],
                                                     psi_w["theta_logit"], steps=1, halving=True)
                f_w = solver.marginal(parts)
            else:
                f_w = self.objective[genes]
            moved = torch.zeros_like(f_w, dtype=torch.bool)
            for name, c in self._coordinates():
                nu_w, omega_w, f_w, picked = self._coordinate_step(solver, nu_w, omega_w, psi_w,
                                                                   f_w, name, c)
                moved = moved | picked
            self.still[genes] = torch.where(moved, 0, self.still[genes] + 1)
            self.moved[genes] = moved
            nu[genes], omega[genes] = nu_w, omega_w
            for key in psi:
                psi[key][genes] = psi_w[key]
            if self.objective is None:  # first epoch: every gene works
                self.objective = f_w.clone()
            else:
                self.objective[genes] = f_w
            self.solver.write(nu, omega)
            m.sigma.copy_(psi["sigma"])
            m.theta_logit.copy_(psi["theta_logit"])

    def _coordinate_step(self, solver: _ModeSolver, nu, omega, psi: dict, f0: Tensor, name: str,
                         c: int):
        x0 = psi[name][:, c].clone()
        h = torch.full_like(x0, 0.1) if name == "theta_logit" else 0.05 * x0.abs().clamp(min=0.1)

        def shifted(x: Tensor) -> dict:
            new = {k: t.clone() for k, t in psi.items()}
            if name == "theta_logit":
                x = x.clamp(-THETA_LOGIT_BOUND, THETA_LOGIT_BOUND)
            new[name][:, c] = x
            return new

        points = [shifted(x0 - h), shifted(x0 + h)]
        results = [self._profile(solver, nu, omega, p) for p in points]
        f_lo, f_hi = results[0][2], results[1][2]
        slope = (f_hi - f_lo) / (2 * h)
        curv = (f_hi - 2 * f0 + f_lo) / (h * h)
        newton = -slope / curv.clamp(max=-1e-12)
        jump = torch.where(curv < 0, newton, torch.sign(slope) * MAX_VARIANCE_STEP)
        points.append(shifted(x0 + jump.clamp(-MAX_VARIANCE_STEP, MAX_VARIANCE_STEP)))
        results.append(self._profile(solver, nu, omega, points[-1]))
        # per gene keep the best of: current, minus, plus, proposed
        values = torch.nan_to_num(torch.stack([f0] + [r[2] for r in results]), nan=-float("inf"))
        best = values.argmax(0)
        # moves that gain less than the fitting tolerance are not worth the lockstep epochs
        pick = torch.arange(best.shape[0], device=best.device)
        best = torch.where(values[best, pick] - f0 > self._threshold(f0), best,
                           torch.zeros_like(best))
        for key in psi:
            psi[key] = torch.stack([psi[key]] + [p[key] for p in points])[best, pick]
        nu = torch.stack([nu] + [r[0] for r in results])[best, pick]
        omega = torch.stack([omega] + [r[1] for r in results])[best, pick]
        return nu, omega, values[best, pick], best > 0
