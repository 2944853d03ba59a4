"""K-FAC's checkpoint state: resume bit-identically, on any device and any number of ranks.

:class:`KFACCheckpoint` gives :class:`~kfac_lens.KFAC` its ``state_dict`` / ``load_state_dict``: the
factors (Appendix D's running averages), the source of the live inverse (so that it is rebuilt by the same
path, bit for bit; Appendix G), λ, γ, δ₀ (Appendix F), k, the random stream and ``param_groups``.
"""

from __future__ import annotations

import hashlib
import warnings

import torch

from ..curvature.factors import KroneckerFactors
from ..curvature.inverses import factor_eigs
from ..distributed import rank_seed


class KFACCheckpoint:
    """Mixin of :class:`~kfac_lens.KFAC`: its state, saved and restored."""

    def _rebuild_inverse(self, factors: KroneckerFactors, gamma: float, pi, shared_eigs: bool):
        """The live inverse again, by the path that built it: by Cholesky, or (states saved by earlier
        versions after a block-diagonal γ search) from the shared eigendecompositions. The two agree only to
        rounding, so a resumed run that took the other path would drift from the uninterrupted one."""
        return self._build_inverse(gamma, factors, eigs=factor_eigs(factors) if shared_eigs else None, pi=pi)

    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: factors, the inverse's source (factors, γ, π and
        whether a γ search's shared eigendecomposition built it), λ, γ, δ₀, k, RNG, lr (param_groups)."""
        src = None
        if self._inverse_source is not None:
            f, g, pi, shared = self._inverse_source
            src = {"factors": f.state_dict(), "gamma": g, "pi": pi, "shared_eigs": shared}
        return {"k": self.k, "lambda": self.lam, "gamma": self.gamma, "inverse_kind": self.inverse_kind,
                # A snapshot: the live factors are updated in place (EMA), so hand out copies.
                "factors": None if self.factors is None else self.factors.clone().state_dict(),
                "inverse_source": src,
                "delta0": None if self.delta0 is None else [d.clone() for d in self.delta0],
                "generator": self.generator.get_state(),
                "generator_device": self.generator.device.type,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

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
            pi, shared = src.get("pi", self.hyper.at(self.k).pi), bool(src.get("shared_eigs", False))
            self._inverse_source = (f, g, pi, shared)
            self.inverse = self._rebuild_inverse(f, g, pi, shared)
        self._restore_generator(sd["generator"], sd.get("generator_device"))
        for group, saved in zip(self.param_groups, sd.get("param_groups", [])):  # (older states: lr = 1)
            group.update(saved)

    def _restore_generator(self, state: torch.Tensor, saved_on: str | None) -> None:
        """Continue the saved random stream (S₁, S₂, sampled targets) on the same kind of device. A stream
        saved on another kind (CPU ↔ CUDA) cannot continue there, so a new one is seeded from it,
        deterministically, and a warning says that the run is reproducible but not identical to a resume
        on the original device."""
        state = state.cpu() if hasattr(state, "cpu") else state
        here = self.generator.device.type
        if self.shards.rank > 0:  # a checkpoint holds rank 0's stream; rank r continues from one derived from it
            digest = int.from_bytes(hashlib.sha256(bytes(state.tolist())).digest()[:7], "little")
            self.generator.manual_seed(rank_seed(digest, self.shards.rank))
            return
        if saved_on in (None, here):
            try:
                self.generator.set_state(state)
                return
            except RuntimeError:  # (states saved before ``generator_device`` existed, on another device)
                pass
        seed = int.from_bytes(hashlib.sha256(bytes(state.tolist())).digest()[:8], "little")
        self.generator.manual_seed(seed)
        warnings.warn(f"K-FAC state: its random stream was saved on {saved_on or 'another device'} and this "
                      f"optimizer samples on {here}; sampling continues from a stream seeded from the saved one, "
                      "so the run is reproducible but not bit-identical to a resume on the original device.",
                      RuntimeWarning, stacklevel=3)

    def __getstate__(self) -> dict:  # torch.optim.Optimizer's keeps only defaults, state and param_groups
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
