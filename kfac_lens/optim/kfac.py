"""The K-FAC optimizer: Algorithm 2 of Appendix H, with the full damping machinery (Appendices D–G, J).

One iteration on a mini-batch S′ of size m:

1. forward/backward on S′ → h(θ) and ∇h (plus the ℓ2 term η θ); one extra backward pass with targets
   sampled from the model on a τ₁·m subset S₁ → new Ā, G (diagonal and, for the tridiagonal inverse,
   neighbouring cross-layer blocks), kept as an EMA with ε = min(1 − 1/k, 0.95) (Appendix D; :mod:`.passes`);
2. candidates Γ = {γ, ω₂γ, γ/ω₂} every T₂ iterations, else {γ} (Appendix E.6);
3. for each γ: Δ = −F̃⁻¹∇h with the approximate inverse of the factored-Tikhonov-damped F̃ (refreshed when
   k ≡ 0 mod T₃ or k ≤ 3; Appendix G; one inverse per candidate, by Cholesky), by Appendix G's low-rank
   form for block-diagonal layers wider than the batch;
4. δ = αΔ + μδ₀ minimising M over span{Δ, δ₀} with the exact F on a τ₂·m subset S₂, from J-products of
   the gradient pass's activations (Appendices E.4, F, J; :mod:`.fisher_products`);
5. keep the δ (and γ) with the lowest M(δ); every T₁ iterations update λ by the Levenberg–Marquardt rule
   on ρ = (h(θ+δ) − h(θ)) / M(δ) (Appendix E.5); θ ← θ + lr·δ (lr = 1: the paper's step).

``KFAC`` is a :class:`torch.optim.Optimizer`: ``step(x, y)`` runs an iteration on (x, y), and ``step()``
(or ``step(closure)``) one on the batch of the user's own forward, loss and backward pass (:mod:`.dropin`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch

from ..capture import check_inputs, warn_if_link_applied_twice
from ..curvature.factors import KroneckerFactors
from ..curvature.inverses import BlockDiagonalInverse, make_inverse
from ..distributed import CaseShards, rank_seed
from ..errors import IllConditionedWarning, SingularFactorError
from ..likelihoods import get_likelihood
from ..options import Estimator, InverseKind, parse
from .dropin import BatchRecorder, recorded_pass, torch_loss
from .fisher_products import fisher_gram_from_pass, linearisation_plan
from .general import check_inverse_uses, kfac_view, output_nll
from .passes import GradientPass, can_reuse_pass, checked_loss, gradient_pass, pass_statistics, subset_statistics
from .hyperparams import KFACHyperParameters
from .kfac_analysis import ProposalAnalysis
from .kfac_state import KFACCheckpoint
from .proposals import Proposal, subspace_grams
from .quadratic import SOLUTION_FIELDS, solve_subspaces
from .schedules import ema_decay, gamma_candidates, levenberg_marquardt, resolve

OBJECTIVE_CHUNK = 4096  # cases per forward pass when h(θ) is evaluated on more (Figure 7's analysis)
INVERSE_PAIRS = {"blockdiag": "diag", "tridiag": "tridiag"}


class KFAC(ProposalAnalysis, KFACCheckpoint, torch.optim.Optimizer):
    """K-FAC (Martens & Grosse 2015, Algorithm 2) for an ``nn.Sequential``, or any ``nn.Module`` with
    ``example_input=X[:2]`` (its Linear and Conv2d layers; KFC for convolutions, :mod:`.general`).

    ``likelihood``: "categorical", "bernoulli", "gaussian", a :class:`~kfac_lens.Likelihood`, or the torch loss
    module of your training loop (``nn.CrossEntropyLoss()``, ``nn.BCEWithLogitsLoss()``, ``nn.MSELoss()``,
    reduction "mean"), which also enables ``step()`` after your own ``loss.backward()`` (:mod:`.dropin`).
    Parameters follow the paper's names; each may be a number or a callable of the 1-based step k. They are
    kept, as given, in ``opt.hyper`` (:class:`~kfac_lens.optim.hyperparams.KFACHyperParameters`, which may be
    edited between steps); ``opt.hyper.at(k)`` gives their checked values at step k.

    - ``inverse``: "blockdiag" (F̆⁻¹, Section 3.2) or "tridiag" (F̂⁻¹, Section 3.3), or an
      :class:`~kfac_lens.options.InverseKind`.
    - ``lr`` = 1: scales the final update, θ ← θ + lr·δ (``param_groups[0]["lr"]``, so torch's lr schedulers
      apply). K-FAC already chooses the step length (α, μ of Appendices E.4, F); lr = 1 is the paper's step,
      and 0 < lr < 2 keeps M(lr·δ) = lr(2 − lr)M(δ) < 0. ρ (E.5) uses M of the step taken.
    - ``lambda_init`` = 150 (E.5), ``eta`` = 1e-5 (ℓ2 strength; Section 7), ``gamma_init`` = √(λ+η) (E.6).
    - ``T1`` = 5 (λ rule period), ``T2`` = 20 (γ search period, a multiple of ``T3``), ``T3`` = 20
      (inverse refresh period).
    - ``omega1`` = (19/20)^T1, ``omega2`` = (√(19/20))^T2; ``tau1`` = 1/8 (factor-statistics subset).
    - ``tau2`` = 1/4: the subset for the exact-F products of α, μ, M (E.4, F). Take ``tau2=1`` when a few
      cases carry the loss (a small batch of a nearly fitted classifier): on S₂ they may be missed (README).
    - ``momentum`` = True (Appendix F), ``rescale`` = True (E.4), ``pi`` = "trace" or 1 (E.3),
      ``eps_max`` = 0.95 (EMA cap), ``low_rank`` = True (Appendix G trick, block-diagonal only).
    - ``adapt_gamma`` / ``adapt_lambda`` = True switch the E.6 / E.5 rules off when False.
    - ``curvature_estimator``: "mc" (the paper's one backward pass with sampled targets, Appendix D) or
      "exact" (expectation over y exact; for tests and small problems); or an
      :class:`~kfac_lens.options.Estimator`.
    - ``example_input``: a few cases of input, for a model that is not an ``nn.Sequential`` (or pass a
      :class:`~kfac_lens.NetworkView`). Layers used several times per case take KFAC-expand factors (KFC for
      convolutions) and no Appendix G low-rank form; an (N, T, C) output has one likelihood term per position
      (``step(x, y)`` only; :mod:`.general`).

    Runs on the model's device in the model's dtype. ``seed`` makes subsets and sampled targets
    reproducible. In an ordinary training loop::

        loss_fn = nn.CrossEntropyLoss()
        opt = KFAC(model, loss_fn)  # instead of, e.g., torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    """

    def __init__(self, model, likelihood, inverse: str = "blockdiag", *, lr=1.0, lambda_init=150.0, eta=1e-5,
                 gamma_init=None, T1=5, T2=20, T3=20, omega1=None, omega2=None, tau1=1 / 8, tau2=1 / 4,
                 momentum=True, rescale=True, pi="trace", eps_max=0.95, low_rank=True,
                 adapt_gamma=True, adapt_lambda=True, curvature_estimator="mc", seed: int = 0, distributed=None,
                 example_input=None):
        self.shards = CaseShards(distributed)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError("model: KFAC(..., distributed=True) replaces DistributedDataParallel (it all-reduces "
                             "the gradient and K-FAC's statistics itself); pass the unwrapped model.module.")
        self.view = kfac_view(model, example_input)
        self.model = self.view.model
        self.torch_loss = torch_loss(likelihood)
        self.likelihood = get_likelihood(self.torch_loss.likelihood if self.torch_loss else likelihood)
        if not self.view.is_general:
            warn_if_link_applied_twice(self.view, self.likelihood)
        inverse = parse(InverseKind, inverse, "inverse").value
        check_inverse_uses(self.view, inverse)
        self.inverse_kind = inverse
        try:
            estimator = parse(Estimator, curvature_estimator, "curvature_estimator")
        except ValueError:
            estimator = None
        if estimator not in (Estimator.MC, Estimator.EXACT):
            raise ValueError(f"curvature_estimator must be 'mc' (the paper's one sampled backward pass) or "
                             "'exact' (expectation over y exact; costs C backward passes), "
                             f"got {curvature_estimator!r}.")
        self.curvature_estimator = estimator.value
        self.layers = list(range(len(self.view)))
        super().__init__([p for L in self.view.layers for p in L.module.parameters()], {"lr": lr})
        self.hyper = KFACHyperParameters(eta=eta, T1=T1, T2=T2, T3=T3, omega1=omega1, omega2=omega2, tau1=tau1,
                                         tau2=tau2, momentum=momentum, rescale=rescale, pi=pi, eps_max=eps_max,
                                         low_rank=low_rank, adapt_gamma=adapt_gamma, adapt_lambda=adapt_lambda)
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
        self.generator.manual_seed(rank_seed(int(seed), self.shards.rank))
        self._plan = linearisation_plan(self.view)
        self.recorder = BatchRecorder(self.view, self.torch_loss) if self.torch_loss else None

    # ------------------------------------------------------------------ hyper-parameters
    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    def _validate(self, k: int) -> None:
        self.hyper.at(k)  # (raises ValueError on a value the rules cannot use)
        if not 0 < self.lr < 2:
            raise ValueError(f"lr must lie in (0, 2) (it scales K-FAC's step δ; 1 is the paper's), got {self.lr}.")

    # ------------------------------------------------------------------ pieces
    def _subset(self, m: int, tau: float) -> torch.Tensor:
        size = max(1, int(math.ceil(tau * m)))
        if size >= m:
            return torch.arange(m, device=self.view.device)
        return torch.randperm(m, generator=self.generator, device=self.view.device)[:size]

    def _params(self) -> list[torch.Tensor]:
        return self.view.weight_matrices()

    def _objective(self, x, y, eta) -> float:
        """h(θ) = mean NLL + (η/2)‖θ‖² on (x, y) (the NLL over every rank's cases when distributed)."""
        with torch.no_grad():
            n = x.shape[0]
            if n <= OBJECTIVE_CHUNK:
                h = output_nll(self.likelihood, self.model(x), y).double()
            else:  # (an analysis on many cases: the outputs of one chunk at a time)
                h = sum(output_nll(self.likelihood, self.model(xc), yc).double() * xc.shape[0]
                        for xc, yc in zip(x.split(OBJECTIVE_CHUNK), y.split(OBJECTIVE_CHUNK))) / n
            self.shards.mean_([h], n)
            if eta:
                h = h + 0.5 * eta * sum((p * p).sum() for p in self.param_groups[0]["params"]).double()
        return float(h)

    def _gradient_pass(self, x, y) -> tuple[GradientPass, list[torch.Tensor], list[torch.Tensor]]:
        """The pass on all of (x, y) (for :meth:`propose` and :meth:`proposals`), ∇h and the weights."""
        batch = gradient_pass(self.view, self.likelihood, x, y, self.layers)
        checked_loss(float(batch.loss), self.k)
        eta = self.hyper.at(self.k).eta
        params = self._params()
        grad = [dg + eta * W for dg, W in zip(batch.data_grad, params)] if eta else batch.data_grad
        return batch, grad, params

    def _absorb(self, new: KroneckerFactors, k: int) -> None:
        if self.factors is None:
            self.factors = new
        else:
            self.factors.ema_(new, ema_decay(k, self.hyper.at(k).eps_max))

    def _build_inverse(self, gamma: float, factors: KroneckerFactors | None = None, eigs=None, pi=None):
        """The damped inverse (Sections 3.2-3.3, Appendix E.3), in the model's dtype when every damped factor and
        Schur complement is well enough conditioned for it, else built again in float64 (and applied in
        float64 to the model's gradients): a float32 model at small γ keeps every γ candidate and warns of
        nothing; only a factor too ill-conditioned for float64 too is refused (SingularFactorError)."""
        factors = self.factors if factors is None else factors
        pi = self.hyper.at(self.k).pi if pi is None else pi
        if factors.dtype == torch.float64:
            return make_inverse(self.inverse_kind, factors, gamma, pi=pi, eigs=eigs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", IllConditionedWarning)
                return make_inverse(self.inverse_kind, factors, gamma, pi=pi, eigs=eigs)
        except (IllConditionedWarning, SingularFactorError):
            return make_inverse(self.inverse_kind, factors.to(torch.float64), gamma, pi=pi)

    def _proposal_direction(self, inv, grad, batch: GradientPass, params, eta, m) -> list[torch.Tensor]:
        """Δ = −F̃⁻¹∇h, using Appendix G's low-rank form where it is cheaper (block-diagonal only)."""
        if not isinstance(inv, BlockDiagonalInverse):
            return [-u for u in inv.apply(grad)]
        use_lr = self.hyper.at(self.k).low_rank and not self.shards.active  # (the pieces are this rank's only)
        out = []
        for i, (G, W) in enumerate(zip(grad, params)):
            d, D = G.shape
            pieces = batch.low_rank_pieces(i) if use_lr and m * (d + D) < d * D else None
            if pieces is not None:
                u = inv.apply_low_rank(i, *pieces, 1.0)
                if eta:
                    u = u + inv.apply_block(i, eta * W)
            else:
                u = inv.apply_block(i, G)
            out.append(-u)
        return out

    def _refresh_directions(self, candidates, grad, batch, params, eta, m, pi):
        """Δ for each γ candidate at an inverse refresh, and a function giving the live inverse of candidate c:
        one inverse per candidate (Algorithm 2's loop over Γ; by Cholesky, cheaper for the block-diagonal F̆
        than one eigendecomposition of every factor shared by the candidates), the candidates that cannot be
        inverted even in float64 left out (E.6). Returns (candidates, Δs, live inverse of c)."""
        built = [(g, self._try_inverse(g, pi)) for g in candidates]
        built = [(g, inv) for g, inv in built if inv is not None] or [self._raise_gamma(max(candidates), pi)]
        candidates, invs = [g for g, _ in built], [inv for _, inv in built]
        Deltas = [self._proposal_direction(inv, grad, batch, params, eta, m) for inv in invs]
        return candidates, Deltas, lambda c: invs[c]

    def _try_inverse(self, gamma: float, pi):
        """The inverse at ``gamma``, or None (and a warning) when a damped factor is too ill-conditioned to
        invert even in float64: such a γ is left out of the search (Appendix E.6) instead of ending the run."""
        try:
            return self._build_inverse(gamma, pi=pi)
        except SingularFactorError as exc:
            warnings.warn(f"K-FAC iteration {self.k}: γ = {gamma:.4g} is left out of the γ search: {exc}",
                          RuntimeWarning, stacklevel=2)
            return None

    def _raise_gamma(self, gamma: float, pi, tries: int = 40):
        """When no candidate can be inverted, γ/ω₂, γ/ω₂², … until one can (Appendix E.6's grid upwards)."""
        omega2 = self.hyper.at(self.k).omega2
        for _ in range(tries):
            gamma = gamma / omega2
            try:
                inv = self._build_inverse(gamma, pi=pi)
            except SingularFactorError:
                continue
            warnings.warn(f"K-FAC iteration {self.k}: γ raised to {gamma:.4g}, the smallest value on the ω₂ grid "
                          "at which every damped factor can be inverted (in float64 where the model's dtype "
                          "cannot).",
                          RuntimeWarning, stacklevel=2)
            return gamma, inv
        return gamma, self._build_inverse(gamma, pi=pi)  # raises SingularFactorError with its diagnosis

    def _grams(self, Deltas, grad, batch: GradientPass, cases, with_delta0: bool):
        """(gram_F, gram_I, b) of M on span{Δ_c, δ₀} for each candidate c (:func:`.proposals.subspace_grams`),
        gram_F from one J-product pass over ``cases`` of the batch (None: all)."""
        d0 = self.delta0 if with_delta0 else None
        vectors = list(Deltas) + ([d0] if d0 is not None else [])
        gram_F = fisher_gram_from_pass(self.view, self.likelihood, batch, cases, vectors, self._plan)
        self.shards.mean_([gram_F], batch.x.shape[0] if cases is None else cases.numel())
        return subspace_grams(gram_F, Deltas, grad, d0)

    def _combine(self, Delta, grad, source, lam, eta, gamma, rescale, momentum, grams=None,
                 solution=None) -> Proposal:
        """δ from Δ: raw (α = 1), re-scaled (α*), or with momentum ((α*, μ*) jointly; Appendix F).

        ``source`` = (gradient pass, cases) for the J-products; ``grams`` may pass :meth:`_grams` of Δ
        computed with δ₀ (restricted to Δ as needed); ``solution`` a row of :func:`solve_subspaces` already
        at hand (then nothing is computed but δ).
        """
        use_mom = momentum and rescale and self.delta0 is not None
        if solution is None:
            if grams is None:
                grams = self._grams([Delta], grad, *source, use_mom)
            gram_F, gram_I, b = grams
            if not use_mom:
                gram_F, gram_I, b = gram_F[:, :1, :1], gram_I[:, :1, :1], b[:, :1]
            solution = solve_subspaces(gram_F, gram_I, b, lam + eta, rescale)[0].tolist()
        s = dict(zip(SOLUTION_FIELDS, solution))
        if rescale and s["Q00"] <= 0:
            raise ValueError(
                f"the quadratic model has non-positive curvature ΔᵀFΔ + (λ+η)‖Δ‖² = {s['Q00']:.3g} "
                "along the proposal; increase lambda or eta.")
        alpha, mu = s["alpha"], (s["mu"] if use_mom else 0.0)
        delta = [alpha * D for D in Delta]
        if use_mom and mu != 0.0:
            delta = [d + mu * d0 for d, d0 in zip(delta, self.delta0)]
        return Proposal(delta=delta, Delta=Delta, gamma=gamma, alpha=alpha, mu=mu, M=s["M"],
                        extra={"dFd": s["dFd"], "gd": s["gd"], "quad": s["quad"], "lin": s["lin"]})

    # ------------------------------------------------------------------ the iteration
    def _average_over_ranks(self, batch: GradientPass, factors: KroneckerFactors, m: int, n1: int) -> None:
        """Data-parallel K-FAC: the loss and gradient (means over this rank's m cases) and the new factor
        statistics (over its n1 cases of S₁) become means over every rank's cases, in place."""
        self.shards.mean_([batch.loss, *batch.data_grad], m)
        blocks = [*factors.A.blocks.values(), *factors.G.blocks.values()]
        factors.n_cases = self.shards.mean_(blocks, n1)

    def _iterate(self, x, y, run_pass, t0: float) -> dict:
        """Algorithm 2's loop body; ``run_pass(S₁)`` gives the gradient pass and S₁'s factor statistics. A step
        that fails (bad targets, non-finite loss) leaves the random stream where it was."""
        rng = self.generator.get_state()
        try:
            return self._iteration(x, y, run_pass, t0)
        except Exception:
            self.generator.set_state(rng)
            raise

    def _iteration(self, x, y, run_pass, t0: float) -> dict:
        k, m = self.k, x.shape[0]
        h = self.hyper.at(k)
        eta, T1, T2, T3 = h.eta, h.T1, h.T2, h.T3
        rescale, momentum, pi, lam = h.rescale, h.momentum, h.pi, self.lam
        S1 = self._subset(m, h.tau1)
        batch, new_factors = run_pass(S1)
        if self.shards.active:
            self._average_over_ranks(batch, new_factors, m, S1.numel())
        S2 = self._subset(m, h.tau2)
        params = self._params()
        grad = [dg + eta * W for dg, W in zip(batch.data_grad, params)] if eta else batch.data_grad
        refresh = (k % T3 == 0) or k <= 3
        rebuild = refresh or self.inverse is None
        candidates = (gamma_candidates(self.gamma, h.omega2) if (k % T2 == 0 and h.adapt_gamma)
                      else [self.gamma])
        if rebuild:  # the factors change before the new inverse: refuse a non-finite loss first
            checked_loss(float(batch.loss), k)
            self._absorb(new_factors, k)
            candidates, Deltas, live_inverse = self._refresh_directions(candidates, grad, batch, params, eta, m,
                                                                        pi)
        else:
            Deltas = [self._proposal_direction(self.inverse, grad, batch, params, eta, m)]
        use_mom = momentum and rescale and self.delta0 is not None
        solutions = solve_subspaces(*self._grams(Deltas, grad, batch, S2, use_mom), lam + eta, rescale)
        l2 = 0.5 * eta * torch.stack([(W * W).sum() for W in params]).sum() if eta else batch.loss.new_zeros(())
        host = torch.cat([torch.stack([batch.loss, l2]).double(), solutions.flatten()]).tolist()  # the one sync
        loss = checked_loss(host[0], k)
        h0 = loss + host[1] if eta else loss
        if not rebuild:
            self._absorb(new_factors, k)
        width = len(SOLUTION_FIELDS)
        props = [self._combine(Deltas[c], grad, None, lam, eta, gamma, rescale, momentum,
                               solution=host[2 + width * c: 2 + width * (c + 1)])
                 for c, gamma in enumerate(candidates)]
        order = sorted(range(len(props)), key=lambda c: props[c].M)  # best (lowest M) first
        best = props[order[0]]
        if rebuild:
            inv = None
            for c in order:  # the best candidate whose inverse can be built (Appendix E.6)
                best, inv = props[c], live_inverse(c)
                if inv is not None:
                    break
            if inv is None:
                gamma, inv = self._raise_gamma(max(candidates), pi)
                Delta = self._proposal_direction(inv, grad, batch, params, eta, m)
                best = self._combine(Delta, grad, (batch, S2), lam, eta, gamma, rescale, momentum)
            self.inverse = inv
            self._inverse_source = (self.factors.clone(), best.gamma, pi, False)  # (built by Cholesky)
        self.gamma = best.gamma
        # θ ← θ + lr·δ, then the Levenberg–Marquardt rule on the same mini-batch (Appendix E.5).
        lr = self.lr
        step = best.delta if lr == 1.0 else [lr * d for d in best.delta]
        self.view.add_to_weights(step)
        M = best.M if lr == 1.0 else 0.5 * lr * lr * best.extra["quad"] + lr * best.extra["lin"]
        rho = float("nan")
        if k % T1 == 0 and h.adapt_lambda:
            h1 = self._objective(x, y, eta)
            rho = (h1 - h0) / M if M != 0 else float("nan")
            self.lam = levenberg_marquardt(self.lam, rho, h.omega1)
        self.delta0 = [d.detach() for d in step]  # (fresh tensors: nothing else holds them)
        self.k += 1
        return {"iteration": k, "loss": loss, "objective": h0, "lambda": self.lam, "gamma": self.gamma,
                "alpha": best.alpha, "mu": best.mu, "rho": rho, "M": M, "batch_size": m,
                "inverse_refreshed": refresh, "step_time": time.perf_counter() - t0}

    # ------------------------------------------------------------------ public API
    def step(self, x=None, y=None, *, closure=None):
        """One K-FAC iteration (Algorithm 2); returns its statistics.

        - ``step(x, y)``: on the mini-batch (x, y); the optimizer runs the passes itself.
        - ``step()``: on the batch of your own ``loss = loss_fn(model(x), y); loss.backward()``, where
          ``loss_fn`` is the torch loss module given to KFAC; the gradient is read from ``.grad``.
        - ``step(closure)``: calls ``closure()`` (which runs that forward, loss and backward pass), then
          ``step()``, and returns the closure's loss like any torch optimizer.
        """
        if callable(x) and y is None and closure is None:
            x, closure = None, x
        if closure is not None:
            if x is not None or y is not None:
                raise ValueError("pass either (x, y) or a closure to step(), not both.")
            with torch.enable_grad():
                loss = closure()
            self._dropin_step()
            return loss
        if x is None:
            if y is not None:
                raise ValueError("step(x, y) needs the inputs x as well as the targets y.")
            return self._dropin_step()
        t0 = time.perf_counter()
        self._validate(self.k)
        x, y = check_inputs(self.view, x, y, what="the mini-batch x")
        pairs = INVERSE_PAIRS[self.inverse_kind]

        def run_pass(S1):
            batch = gradient_pass(self.view, self.likelihood, x, y, self.layers)
            return batch, self._statistics(batch, S1, pairs)

        with self._own_passes():
            return self._iterate(x, y, run_pass, t0)

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "param_groups", None):  # (torch.optim.Optimizer.__init__ adds the one group)
            raise ValueError("K-FAC preconditions all Linear layers of the model together (one parameter group); "
                             "it cannot take more parameters.")
        super().add_param_group(param_group)

    def _dropin_step(self) -> dict:
        if self.recorder is None:
            raise ValueError("step() without (x, y) reads the batch of your own forward, loss and backward pass; "
                             "give KFAC the torch loss module your loop calls, e.g. KFAC(model, "
                             "nn.CrossEntropyLoss()), or call step(x, y).")
        t0 = time.perf_counter()
        self._validate(self.k)
        with self._own_passes():
            batch = recorded_pass(self.recorder, self.likelihood)
            pairs = INVERSE_PAIRS[self.inverse_kind]

            def run_pass(S1):  # the gradient is the user's
                return batch, self._statistics(batch, S1, pairs)

            return self._iterate(batch.x, batch.y, run_pass, t0)

    def _statistics(self, batch: GradientPass, S1: torch.Tensor, pairs: str) -> KroneckerFactors:
        """New factor statistics on S₁ (Appendix D): from the pass's stored ā_k and z where the chain allows
        (only the backward pass with sampled targets is run), else with a forward pass on S₁ of their own."""
        if can_reuse_pass(self.view, batch, self._plan):
            return pass_statistics(self.view, self.likelihood, batch, S1, self.layers, self.curvature_estimator,
                                   self.generator, pairs, self._plan)
        return subset_statistics(self.view, self.likelihood, batch.x[S1], self.layers, self.curvature_estimator,
                                 self.generator, pairs)

    def _own_passes(self):
        """The optimizer's own passes through the model are not the user's batch (drop-in recording)."""
        return self.recorder.paused() if self.recorder is not None else contextlib.nullcontext()

    def remove_hooks(self) -> None:
        """Remove the drop-in forward hooks from the model and the loss module (``step(x, y)`` still works)."""
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None

    def __repr__(self) -> str:
        return f"KFAC(inverse={self.inverse_kind!r}, k={self.k}, λ={self.lam:.4g}, γ={self.gamma:.4g}, lr={self.lr:g})"
