"""The K-FAC optimizer: Algorithm 2 of Appendix H, with the full damping machinery (Appendices D–G, J).

One iteration on a mini-batch S′ of size m:

1. forward/backward on S′ → h(θ) and ∇h (plus the ℓ2 term η θ);
2. one extra backward pass with targets sampled from the model on a τ₁·m subset S₁ → new Ā, G
   (diagonal and, for the tridiagonal inverse, neighbouring cross-layer blocks), kept as an EMA with
   ε = min(1 − 1/k, 0.95) (Appendix D);
3. candidates Γ = {γ, ω₂γ, γ/ω₂} every T₂ iterations, else {γ} (Appendix E.6);
4. for each γ: the approximate inverse of the factored-Tikhonov-damped F̃ (refreshed when k ≡ 0 mod T₃
   or k ≤ 3; Appendix G), Δ = −F̃⁻¹∇h (low-rank trick of Appendix G for block-diagonal layers wider than
   the batch), and δ = αΔ + μδ₀ minimising M over span{Δ, δ₀} with the exact F on a τ₂·m subset S₂,
   from J-products only (Appendices E.4, F, J);
5. keep the δ (and γ) with the lowest M(δ); every T₁ iterations update λ by the Levenberg–Marquardt
   rule on ρ = (h(θ+δ) − h(θ)) / M(δ) (Appendix E.5); θ ← θ + δ.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..capture import check_inputs, forward, warn_if_link_applied_twice
from ..curvature.factors import KroneckerFactors, compute_factors
from ..curvature.fisher import fisher_gram
from ..curvature.inverses import BlockDiagonalInverse, factor_eigs, make_inverse
from ..errors import NonFiniteError
from ..likelihoods import get_likelihood
from ..nets import NetworkView
from .quadratic import SubspaceModel, dot
from .schedules import ema_decay, gamma_candidates, levenberg_marquardt, resolve

INVERSE_PAIRS = {"blockdiag": "diag", "tridiag": "tridiag"}


@dataclass
class Proposal:
    """An update δ = αΔ + μδ₀ and what the quadratic model says of it."""

    delta: list[torch.Tensor]
    Delta: list[torch.Tensor]
    gamma: float
    alpha: float
    mu: float
    M: float
    improvement: float = float("nan")  # h(θ) − h(θ + δ) on the evaluation data, when asked for
    extra: dict = field(default_factory=dict)


def _default_omega1(T1: int) -> float:
    return (19 / 20) ** T1


def _default_omega2(T2: int) -> float:
    return math.sqrt(19 / 20) ** T2


class KFAC:
    """K-FAC (Martens & Grosse 2015, Algorithm 2) for an ``nn.Sequential`` of Linear layers.

    Parameters follow the paper's names; each may be a number or a callable of the 1-based step k.

    - ``inverse``: "blockdiag" (F̆⁻¹, Section 3.2) or "tridiag" (F̂⁻¹, Section 3.3).
    - ``lambda_init`` = 150 (E.5), ``eta`` = 1e-5 (ℓ2 strength; Section 7 autoencoders),
      ``gamma_init`` = √(λ+η) (E.6).
    - ``T1`` = 5 (λ rule period), ``T2`` = 20 (γ search period, a multiple of ``T3``), ``T3`` = 20
      (inverse refresh period).
    - ``omega1`` = (19/20)^T1, ``omega2`` = (√(19/20))^T2.
    - ``tau1`` = 1/8 (factor-statistics subset), ``tau2`` = 1/4 (exact-F products subset).
    - ``momentum`` = True (Appendix F), ``rescale`` = True (E.4), ``pi`` = "trace" or 1 (E.3),
      ``eps_max`` = 0.95 (EMA cap), ``low_rank`` = True (Appendix G trick, block-diagonal only).
    - ``adapt_gamma`` / ``adapt_lambda`` = True switch the E.6 / E.5 rules off when False.
    - ``curvature_estimator``: "mc" (the paper's one backward pass with sampled targets, Appendix D) or
      "exact" (expectation over y exact; for tests and small problems).

    Runs on the model's device in the model's dtype. ``seed`` makes subsets and sampled targets
    reproducible.
    """

    def __init__(self, model, likelihood, inverse: str = "blockdiag", *, lambda_init=150.0, eta=1e-5,
                 gamma_init=None, T1=5, T2=20, T3=20, omega1=None, omega2=None, tau1=1 / 8, tau2=1 / 4,
                 momentum=True, rescale=True, pi="trace", eps_max=0.95, low_rank=True,
                 adapt_gamma=True, adapt_lambda=True, curvature_estimator="mc", seed: int = 0):
        self.view = NetworkView(model)
        self.model = self.view.model
        self.likelihood = get_likelihood(likelihood)
        warn_if_link_applied_twice(self.view, self.likelihood)
        if inverse not in INVERSE_PAIRS:
            raise ValueError(f"inverse must be 'blockdiag' or 'tridiag', got {inverse!r}.")
        self.inverse_kind = inverse
        if curvature_estimator not in ("mc", "exact"):
            raise ValueError(f"curvature_estimator must be 'mc' (the paper's one sampled backward pass) or "
                             "'exact' (expectation over y exact; costs C backward passes), "
                             f"got {curvature_estimator!r}.")
        self.curvature_estimator = curvature_estimator
        self.layers = list(range(len(self.view)))
        self.hp = dict(eta=eta, T1=T1, T2=T2, T3=T3, tau1=tau1, tau2=tau2, momentum=momentum,
                       rescale=rescale, pi=pi, eps_max=eps_max, low_rank=low_rank,
                       adapt_gamma=adapt_gamma, adapt_lambda=adapt_lambda,
                       omega1=omega1 if omega1 is not None else (lambda k: _default_omega1(resolve(T1, k))),
                       omega2=omega2 if omega2 is not None else (lambda k: _default_omega2(resolve(T2, k))))
        self._validate(1)
        lam = float(resolve(lambda_init, 1))
        if not lam >= 0:
            raise ValueError(f"lambda_init must be ≥ 0, got {lam}.")
        self.lam = lam
        eta0 = float(resolve(eta, 1))
        self.gamma = float(resolve(gamma_init, 1)) if gamma_init is not None else math.sqrt(lam + eta0)
        self.k = 1
        self.factors: KroneckerFactors | None = None
        self.inverse = None
        # How the live inverse was built — (factors snapshot, γ, π, shared eigendecomposition?) — so that
        # load_state_dict rebuilds it by the same path, bit for bit (see :meth:`_rebuild_inverse`).
        self._inverse_source: tuple | None = None
        self.delta0: list[torch.Tensor] | None = None
        self.generator = torch.Generator(device=self.view.device)
        self.generator.manual_seed(int(seed))

    # ------------------------------------------------------------------ hyper-parameters
    def _h(self, name: str, k: int | None = None):
        return resolve(self.hp[name], self.k if k is None else k)

    def _validate(self, k: int) -> None:
        T1, T2, T3 = (int(self._h(n, k)) for n in ("T1", "T2", "T3"))
        if min(T1, T2, T3) < 1:
            raise ValueError(f"T1, T2, T3 must be positive integers, got {T1}, {T2}, {T3}.")
        if T2 % T3:
            raise ValueError(f"T2 = {T2} must be a multiple of T3 = {T3} (Appendix E.6), so that the γ search "
                             "happens on iterations where the inverse is recomputed.")
        for n in ("tau1", "tau2"):
            t = float(self._h(n, k))
            if not 0 < t <= 1:
                raise ValueError(f"{n} must lie in (0, 1], got {t}.")
        for n in ("omega1", "omega2"):
            w = float(self._h(n, k))
            if not 0 < w < 1:
                raise ValueError(f"{n} must lie in (0, 1), got {w}.")
        if float(self._h("eta", k)) < 0:
            raise ValueError("eta must be ≥ 0.")
        pi = self._h("pi", k)
        if not (pi == "trace" or (isinstance(pi, (int, float)) and not isinstance(pi, bool) and pi > 0)):
            raise ValueError(f"pi must be 'trace' or a positive number, got {pi!r}.")

    # ------------------------------------------------------------------ pieces
    def _subset(self, m: int, tau: float) -> torch.Tensor:
        size = max(1, int(math.ceil(tau * m)))
        if size >= m:
            return torch.arange(m, device=self.view.device)
        return torch.randperm(m, generator=self.generator, device=self.view.device)[:size]

    def _params(self) -> list[torch.Tensor]:
        return self.view.weight_matrices()

    def _objective(self, x, y, eta) -> float:
        """h(θ) = mean NLL + (η/2)‖θ‖² on (x, y)."""
        with torch.no_grad():
            z = self.model(x)
            h = float(self.likelihood.nll(z, y))
            if eta:
                h += 0.5 * eta * float(sum((W * W).sum() for W in self._params()))
        return h

    def _gradient(self, x, y, eta):
        """Loss, ∇h as per-layer matrices, and the rank-m pieces (g columns, ā rows) of the data term."""
        z, a, s = forward(self.view, x, self.layers)
        y = self.likelihood.check_targets(z.detach(), y)
        loss = self.likelihood.nll(z, y)
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"the loss is {float(loss.detach())} at iteration {self.k}; training has diverged. Lower lambda's "
                "decay (omega1 closer to 1), raise lambda_init or check the data. The last good checkpoint is kept."
            )
        gs = torch.autograd.grad(loss, [s[k] for k in self.layers])
        data_grad = [g.T @ a[k] for g, k in zip(gs, self.layers)]
        params = self._params()
        grad = [dg + eta * W for dg, W in zip(data_grad, params)] if eta else data_grad
        pieces = [(g.T, a[k]) for g, k in zip(gs, self.layers)]
        return float(loss.detach()), grad, pieces, params

    def _update_factors(self, x, k: int) -> None:
        S1 = self._subset(x.shape[0], float(self._h("tau1", k)))
        new = compute_factors(self.view, x[S1], self.likelihood, self.layers, self.curvature_estimator, samples=1,
                              generator=self.generator, pairs=INVERSE_PAIRS[self.inverse_kind], progress=False)
        if self.factors is None:
            self.factors = new
        else:
            self.factors.ema_(new, ema_decay(k, float(self._h("eps_max", k))))

    def _build_inverse(self, gamma: float, factors: KroneckerFactors | None = None, eigs=None, pi=None):
        return make_inverse(self.inverse_kind, self.factors if factors is None else factors, gamma,
                            pi=self._h("pi") if pi is None else pi, eigs=eigs)

    def _rebuild_inverse(self, factors: KroneckerFactors, gamma: float, pi, shared_eigs: bool):
        """The live inverse again, by the path that built it: with the eigendecompositions shared by a γ
        search (block-diagonal) or by Cholesky otherwise. The two agree only to rounding, so a resumed run
        that took the other path would drift from the uninterrupted one."""
        return self._build_inverse(gamma, factors, eigs=factor_eigs(factors) if shared_eigs else None, pi=pi)

    def _shared_eigs(self, n_gammas: int):
        """For several block-diagonal inverses of the same factors (the γ search), one eigendecomposition of
        each undamped factor serves every γ."""
        if self.inverse_kind == "blockdiag" and n_gammas > 1:
            return factor_eigs(self.factors)
        return None

    def _proposal_direction(self, inv, grad, pieces, params, eta, m) -> list[torch.Tensor]:
        """Δ = −F̃⁻¹∇h, using Appendix G's low-rank form where it is cheaper (block-diagonal only)."""
        if not isinstance(inv, BlockDiagonalInverse):
            return [-u for u in inv.apply(grad)]
        use_lr = bool(self._h("low_rank"))
        out = []
        for i, (G, (gcols, arows), W) in enumerate(zip(grad, pieces, params)):
            d, D = G.shape
            if use_lr and m * (d + D) < d * D:
                u = inv.apply_low_rank(i, gcols, arows, 1.0)
                if eta:
                    u = u + inv.apply_block(i, eta * W)
            else:
                u = inv.apply_block(i, G)
            out.append(-u)
        return out

    def _grams(self, Delta, grad, x2, with_delta0: bool):
        """The λ-independent pieces of M on span{Δ, δ₀}: [vᵀFv] (J-products on x2), [vᵀv] and [∇hᵀv]."""
        vecs = [Delta, self.delta0] if (with_delta0 and self.delta0 is not None) else [Delta]
        gram_F = fisher_gram(self.view, x2, self.likelihood, vecs, checked=True)
        n = len(vecs)
        gram_I = torch.empty(n, n, dtype=gram_F.dtype, device=gram_F.device)
        b = torch.empty(n, dtype=gram_F.dtype, device=gram_F.device)
        for i in range(n):
            b[i] = dot(grad, vecs[i])
            for j in range(i, n):
                gram_I[i, j] = gram_I[j, i] = dot(vecs[i], vecs[j])
        return gram_F, gram_I, b

    def _combine(self, Delta, grad, x2, lam, eta, gamma, rescale, momentum, grams=None) -> Proposal:
        """δ from Δ: raw (α = 1), re-scaled (α*), or with momentum ((α*, μ*) jointly; Appendix F).

        ``grams`` may pass :meth:`_grams` computed with δ₀ (they are then restricted to Δ as needed).
        """
        damping = lam + eta
        use_mom = momentum and rescale and self.delta0 is not None
        if grams is None:
            grams = self._grams(Delta, grad, x2, use_mom)
        gram_F, gram_I, b = grams
        if not use_mom:
            gram_F, gram_I, b = gram_F[:1, :1], gram_I[:1, :1], b[:1]
        n = b.shape[0]
        sub = SubspaceModel(gram_F, gram_I, b, damping)
        if rescale:
            c = sub.minimize()
        else:
            c = torch.ones(1, dtype=b.dtype, device=b.device)
        alpha = float(c[0])
        mu = float(c[1]) if n > 1 else 0.0
        delta = [alpha * D for D in Delta]
        if n > 1:
            delta = [d + mu * d0 for d, d0 in zip(delta, self.delta0)]
        return Proposal(delta=delta, Delta=Delta, gamma=gamma, alpha=alpha, mu=mu, M=sub.value(c),
                        extra={"dFd": float(gram_F[0, 0]), "gd": float(b[0])})

    # ------------------------------------------------------------------ public API
    def step(self, x, y) -> dict:
        """One K-FAC iteration (Algorithm 2) on the mini-batch (x, y); returns its statistics."""
        t0 = time.perf_counter()
        k = self.k
        self._validate(k)
        x, y = check_inputs(self.view, x, y, what="the mini-batch x")
        m = x.shape[0]
        eta = float(self._h("eta"))
        loss, grad, pieces, params = self._gradient(x, y, eta)
        h0 = loss + (0.5 * eta * float(sum((W * W).sum() for W in params)) if eta else 0.0)
        self._update_factors(x, k)
        T1, T2, T3 = int(self._h("T1")), int(self._h("T2")), int(self._h("T3"))
        refresh = (k % T3 == 0) or k <= 3
        candidates = (gamma_candidates(self.gamma, float(self._h("omega2")))
                      if (k % T2 == 0 and self._h("adapt_gamma")) else [self.gamma])
        S2 = self._subset(m, float(self._h("tau2")))
        x2 = x[S2]
        best, best_inv = None, None
        pi = self._h("pi")
        eigs = self._shared_eigs(len(candidates)) if (refresh or self.inverse is None) else None
        for gamma in candidates:
            inv = self._build_inverse(gamma, eigs=eigs, pi=pi) if (refresh or self.inverse is None) else self.inverse
            Delta = self._proposal_direction(inv, grad, pieces, params, eta, m)
            prop = self._combine(Delta, grad, x2, self.lam, eta, gamma, bool(self._h("rescale")),
                                 bool(self._h("momentum")))
            if best is None or prop.M < best.M:
                best, best_inv = prop, inv
        if refresh or self.inverse is None:
            self.inverse = best_inv
            self._inverse_source = (self.factors.clone(), best.gamma, pi, eigs is not None)
        self.gamma = best.gamma
        # θ ← θ + δ, then the Levenberg–Marquardt rule on the same mini-batch (Appendix E.5).
        self.view.add_to_weights(best.delta)
        rho = float("nan")
        if k % T1 == 0 and self._h("adapt_lambda"):
            h1 = self._objective(x, y, eta)
            rho = (h1 - h0) / best.M if best.M != 0 else float("nan")
            self.lam = levenberg_marquardt(self.lam, rho, float(self._h("omega1")))
        self.delta0 = [d.detach().clone() for d in best.delta]
        self.k += 1
        return {"iteration": k, "loss": loss, "objective": h0, "lambda": self.lam, "gamma": self.gamma,
                "alpha": best.alpha, "mu": best.mu, "rho": rho, "M": best.M, "batch_size": m,
                "inverse_refreshed": refresh, "step_time": time.perf_counter() - t0}

    @torch.no_grad()
    def _improvement(self, delta, x, y, eta, h0: float | None = None) -> float:
        h0 = self._objective(x, y, eta) if h0 is None else h0
        saved = self.view.weight_matrices()  # restore exactly: θ + δ − δ ≠ θ in floating point
        self.view.add_to_weights(delta)
        try:
            h1 = self._objective(x, y, eta)
        finally:
            self.view.set_weight_matrices(saved)
        return h0 - h1

    def propose(self, x, y, gamma: float | None = None, *, rescale: bool = True, momentum: bool = True,
                lam: float | None = None, eval_x=None, eval_y=None) -> Proposal:
        """Compute (without applying) the update K-FAC would make on (x, y) with the current factors.

        ``gamma`` overrides the factored-Tikhonov strength (a fresh inverse is built for it),
        ``rescale=False`` returns the raw Δ, ``momentum=False`` drops δ₀, ``lam`` overrides λ.
        The improvement h(θ) − h(θ+δ) is measured on (eval_x, eval_y), default (x, y). Uses the
        factors as they are (they must exist: take at least one :meth:`step` first). The exact-F
        products use all of x (no τ₂ subset), so the result is deterministic.
        """
        if self.factors is None:
            raise ValueError("propose() needs the Kronecker factors: run at least one step() first.")
        x, y = check_inputs(self.view, x, y, what="x")
        eta = float(self._h("eta"))
        lam = self.lam if lam is None else float(lam)
        _, grad, pieces, params = self._gradient(x, y, eta)
        g = self.gamma if gamma is None else float(gamma)
        inv = self.inverse if (gamma is None and self.inverse is not None) else self._build_inverse(g)
        Delta = self._proposal_direction(inv, grad, pieces, params, eta, x.shape[0])
        prop = self._combine(Delta, grad, x, lam, eta, g, rescale, momentum)
        ex, ey = (x, y) if eval_x is None else check_inputs(self.view, eval_x, eval_y, what="eval_x")
        prop.improvement = self._improvement(prop.delta, ex, ey, eta)
        return prop

    VARIANTS = {"re-scaled, momentum": (True, True), "re-scaled, no momentum": (True, False),
                "raw Δ (no re-scaling)": (False, False)}

    def gamma_sweep(self, x, y, gammas, *, lam: float | None = None, variants=None, eval_x=None, eval_y=None,
                    progress: bool = False, cache: dict | None = None):
        """Figure 7's data: for each γ, the improvement h(θ) − h(θ+δ) of the re-scaled update with and
        without momentum and of the raw Δ (Appendix E.4), with the current factors, λ and δ₀.

        The gradient is computed once and each γ's inverse is shared by the variants. ``cache`` (a dict
        you keep between calls on the same x, y) stores the gradient and each γ's Δ, so that a later
        sweep with another λ or γ grid only recomputes what changed. Returns a DataFrame with columns
        gamma, variant, improvement, M, alpha, mu.
        """
        import pandas as pd
        from tqdm.auto import tqdm
        if self.factors is None:
            raise ValueError("gamma_sweep() needs the Kronecker factors: run at least one step() first.")
        x, y = check_inputs(self.view, x, y, what="x")
        ex, ey = (x, y) if eval_x is None else check_inputs(self.view, eval_x, eval_y, what="eval_x")
        eta = float(self._h("eta"))
        lam = self.lam if lam is None else float(lam)
        variants = self.VARIANTS if variants is None else {v: self.VARIANTS[v] for v in variants}
        cache = {} if cache is None else cache
        if "grad" not in cache:
            cache["grad"] = self._gradient(x, y, eta)[1:]
        grad, pieces, params = cache["grad"]
        if "h0" not in cache or eval_x is not None:
            cache["h0"] = self._objective(ex, ey, eta)
        h0 = cache["h0"]
        rows = []
        for g in tqdm(list(gammas), desc="γ sweep", disable=not progress, leave=False):
            key = ("Delta", float(g))
            if key not in cache:
                if "eigs" not in cache:
                    cache["eigs"] = self._shared_eigs(len(gammas))
                inv = self._build_inverse(float(g), eigs=cache["eigs"])
                cache[key] = self._proposal_direction(inv, grad, pieces, params, eta, x.shape[0])
            Delta = cache[key]
            gkey = ("grams", float(g))
            if gkey not in cache:
                cache[gkey] = self._grams(Delta, grad, x, with_delta0=True)
            for name, (rescale, momentum) in variants.items():
                prop = self._combine(Delta, grad, x, lam, eta, float(g), rescale, momentum, grams=cache[gkey])
                rows.append({"gamma": float(g), "variant": name,
                             "improvement": self._improvement(prop.delta, ex, ey, eta, h0=h0),
                             "M": prop.M, "alpha": prop.alpha, "mu": prop.mu})
        return pd.DataFrame(rows)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: factors, the inverse's source (factors, γ, π and
        whether a γ search's shared eigendecomposition built it), λ, γ, δ₀, k, RNG."""
        src = None
        if self._inverse_source is not None:
            f, g, pi, shared = self._inverse_source
            src = {"factors": f.state_dict(), "gamma": g, "pi": pi, "shared_eigs": shared}
        return {"k": self.k, "lambda": self.lam, "gamma": self.gamma, "inverse_kind": self.inverse_kind,
                # A snapshot: the live factors are updated in place (EMA), so hand out copies.
                "factors": None if self.factors is None else self.factors.clone().state_dict(),
                "inverse_source": src,
                "delta0": None if self.delta0 is None else [d.clone() for d in self.delta0],
                "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("inverse_kind") != self.inverse_kind:
            raise ValueError(f"state is for inverse={sd.get('inverse_kind')!r}, this optimizer uses "
                             f"{self.inverse_kind!r}.")
        dev, dt = self.view.device, self.view.dtype
        self.k, self.lam, self.gamma = int(sd["k"]), float(sd["lambda"]), float(sd["gamma"])
        self.factors = None if sd["factors"] is None else \
            KroneckerFactors.from_state_dict(sd["factors"]).to(device=dev, dtype=dt).clone()  # EMA is in place
        self.delta0 = None if sd["delta0"] is None else [d.to(device=dev, dtype=dt) for d in sd["delta0"]]
        if sd["inverse_source"] is None:
            self.inverse, self._inverse_source = None, None
        else:
            src = sd["inverse_source"]
            f = KroneckerFactors.from_state_dict(src["factors"]).to(device=dev, dtype=dt)
            g = float(src["gamma"])
            # (states saved before these fields existed: Cholesky, the current π)
            pi, shared = src.get("pi", self._h("pi")), bool(src.get("shared_eigs", False))
            self._inverse_source = (f, g, pi, shared)
            self.inverse = self._rebuild_inverse(f, g, pi, shared)
        self.generator.set_state(sd["generator"].cpu() if hasattr(sd["generator"], "cpu") else sd["generator"])

    def __repr__(self) -> str:
        return f"KFAC(inverse={self.inverse_kind!r}, k={self.k}, λ={self.lam:.4g}, γ={self.gamma:.4g})"

