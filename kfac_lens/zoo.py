"""Recipes that train, and cache by config hash, the networks the figures examine (Sections 3, 7; docs/math.md §9).

Each entry records its training history and the K-FAC optimizer state at the moment of capture, since
Figures 6 and 7 need the γ, λ and δ₀ K-FAC held at that iteration.

- :func:`example_network` — 256-20-20-20-20-20-10 tanh on 16×16 MNIST, trained with K-FAC in batch mode
  until the training error reaches about 5% (Figures 1, 5, 6). ``data="digits"`` gives the
  64-20-20-20-20-20-10 variant on scikit-learn's 8×8 digits.
- :func:`autoencoder` — the MNIST deep autoencoder at iteration 500 of block-tridiagonal K-FAC
  (``preset="paper"``, Figure 7; GPU recommended) or a ``"quick"`` version for 2 CPU cores (see
  :data:`AUTOENCODER_PRESETS` for what differs).
- :func:`training_comparison` — K-FAC (block-diagonal, block-tridiagonal), SGD-Nesterov and Adam on the
  same autoencoder problem, for the training-curve figure.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from . import __version__
from .data import Dataset, load_dataset
from .optim import KFAC, Adam, SGDNesterov, load_checkpoint, save_checkpoint, train

EXAMPLE_PRESETS = {
    # Batch-mode K-FAC (the whole training set every iteration) until ≤ 5% training error.
    "quick": dict(n_train=50000, max_iterations=400, target_error=0.05, lambda_init=1.0, eta=0.0),
    "paper": dict(n_train=50000, max_iterations=2000, target_error=0.05, lambda_init=1.0, eta=0.0),
}

# Iterations of the example network's training whose weights are kept (FisherExplorer picks among them).
SNAPSHOT_ITERATIONS = (1, 5, 10, 20, 40)

# Cases of the training set on which the figures compute F, F̃ and their inverses exactly.
EXAMPLE_ANALYSIS_CASES = {"quick": 50000, "paper": 50000}

AUTOENCODER_PRESETS = {
    # The paper: 784-1000-500-250-30-250-500-1000-784, 50k MNIST cases (the pickle's training split),
    # exponential batch schedule from m₁ = 1000 reaching |S| at k = 500, captured at k = 500.
    "paper": dict(sizes=[784, 1000, 500, 250, 30, 250, 500, 1000, 784], n_train=50000, iterations=500,
                  m1=1000, full_at=500, lambda_init=150.0, eta=1e-5),
    # Quick (2 CPU cores, a few minutes): a narrower net 784-250-100-30-100-250-784 on 10k cases,
    # m₁ = 500 reaching all 10k at k = 150, captured at k = 150, and λ₀ = 1 instead of 150: in only 150
    # iterations λ₀ = 150 spends the whole run shrinking λ (Appendix E.5: λ₀ is application dependent;
    # `kfac-lens bench optimizer` tunes it on a grid). Same activations, loss, η and damping rules.
    "quick": dict(sizes=[784, 250, 100, 30, 100, 250, 784], n_train=10000, iterations=150,
                  m1=500, full_at=150, lambda_init=1.0, eta=1e-5),
}


def default_zoo_dir() -> Path:
    base = os.environ.get("KFAC_LENS_ZOO") or os.path.join(
        os.environ.get("KFAC_LENS_DATA") or os.path.expanduser("~/.cache/kfac_lens"), "zoo")
    return Path(base)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Bump when a recipe changes what it trains, so that stale cache files are not served.
RECIPE_VERSION = 4


def config_hash(config: dict) -> str:
    blob = json.dumps({**config, "kfac_lens": __version__, "recipe": RECIPE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def classifier(sizes, activation=nn.Tanh) -> nn.Sequential:
    """Linear layers of ``sizes`` with ``activation`` between them (softmax lives in the likelihood)."""
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(activation())
    return nn.Sequential(*mods)


def autoencoder_net(sizes) -> nn.Sequential:
    """Deep autoencoder of Section 7: logistic hidden units, a linear code layer (the narrowest), linear output
    (the Bernoulli likelihood applies the sigmoid)."""
    code = sizes.index(min(sizes[1:-1]))
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i + 1 < len(sizes) - 1 and i + 1 != code:
            mods.append(nn.Sigmoid())
    return nn.Sequential(*mods)


def sparse_init_(model: nn.Sequential, n_nonzero: int = 15, seed: int = 0) -> nn.Sequential:
    """Martens (2010)'s sparse initialisation (used by the paper's experiments): each unit gets
    ``n_nonzero`` incoming weights drawn from N(0, 1); biases 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, nn.Linear):
                W = torch.zeros_like(mod.weight)
                k = min(n_nonzero, W.shape[1])
                for r in range(W.shape[0]):
                    idx = torch.randperm(W.shape[1], generator=gen)[:k]
                    W[r, idx] = torch.randn(k, generator=gen, dtype=W.dtype)
                mod.weight.copy_(W)
                mod.bias.zero_()
    return model


@dataclass
class ZooEntry:
    """A trained network at its captured iteration, with what the figures need."""

    name: str
    config: dict
    model: nn.Sequential
    likelihood: str
    data: Dataset
    history: pd.DataFrame
    optimizer: KFAC
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def X(self) -> torch.Tensor:
        return self.data.X.to(self.device)

    @property
    def y(self) -> torch.Tensor:
        return self.data.targets.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def iteration(self) -> int:
        return self.optimizer.k - 1

    @property
    def gamma(self) -> float:
        return self.optimizer.gamma

    @property
    def lam(self) -> float:
        return self.optimizer.lam

    @property
    def snapshot_iterations(self) -> list[int]:
        """Iterations at which the recipe kept a copy of the weights (besides the captured one)."""
        return sorted(self.extra.get("snapshots", {}))

    def at_iteration(self, iteration: int) -> nn.Sequential:
        """A copy of the network with its weights after ``iteration`` (a snapshot, or the captured one)."""
        if iteration == self.iteration:
            state = self.model.state_dict()
        elif iteration in self.extra.get("snapshots", {}):
            state = self.extra["snapshots"][iteration]
        else:
            raise ValueError(f"{self.name} has weights for iterations {self.snapshot_iterations + [self.iteration]}, "
                             f"not {iteration}.")
        model = copy.deepcopy(self.model)
        model.load_state_dict(state)
        return model

    def __repr__(self) -> str:
        err = self.history["error"].dropna()
        return (f"ZooEntry({self.name!r}, iteration={self.iteration}, γ={self.gamma:.4g}, λ={self.lam:.4g}, "
                f"final error={float(err.iloc[-1]) if len(err) else float('nan'):.4g})")


def _load_or_train(name, config, build, train_fn, likelihood, data, cache_dir, device, retrain,
                   distributed=None) -> ZooEntry:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_zoo_dir()
    path = cache_dir / f"{name}-{config_hash(config)}.pt"
    model = build().to(device)
    opt = KFAC(model, likelihood, config["inverse"], lambda_init=config["lambda_init"], eta=config["eta"],
               seed=config.get("seed", 0), distributed=distributed)
    if path.exists() and not retrain:
        ck = load_checkpoint(path, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        return ZooEntry(name, config, model, likelihood, data, ck["history"], opt, path, ck.get("extra", {}))
    out = train_fn(model, opt)
    history, extra = out if isinstance(out, tuple) else (out, {})
    if opt.shards.rank == 0:  # (data-parallel training: rank 0 writes the cache)
        save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "history": history,
                               "config": config, "extra": extra})
    return ZooEntry(name, config, model, likelihood, data, history, opt, path, extra)


def example_network(preset: str = "quick", data: str = "mnist", *, cache_dir=None, device=None,
                    progress: bool = True, retrain: bool = False, seed: int = 0, distributed=None) -> ZooEntry:
    """The paper's example network (Figures 1, 5, 6), partially trained with batch-mode K-FAC to ~5% error."""
    if preset not in EXAMPLE_PRESETS:
        raise ValueError(f"preset must be one of {sorted(EXAMPLE_PRESETS)}, got {preset!r}.")
    if data not in ("mnist", "digits"):
        raise ValueError(f"data must be 'mnist' (16×16 MNIST) or 'digits' (8×8 digits), got {data!r}.")
    p = dict(EXAMPLE_PRESETS[preset])
    ds = load_dataset("mnist16" if data == "mnist" else "digits", "train")
    if len(ds) > p["n_train"]:
        ds = ds.subset(p["n_train"], seed=seed)
    device = torch.device(device) if device is not None else default_device()
    sizes = [ds.X.shape[1], 20, 20, 20, 20, 20, 10]
    config = dict(kind="example", data=data, sizes=sizes, inverse="blockdiag", seed=seed, **p)
    X, y = ds.X.to(device), ds.y.to(device)

    class _Stop(Exception):
        pass

    def run(model, opt):
        rows, snapshots = [], {}

        def stop_at_target(it, row):
            rows.append(row)
            if it in SNAPSHOT_ITERATIONS:
                snapshots[it] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if row.get("error", 1.0) <= p["target_error"]:
                raise _Stop

        try:
            train(model, opt, X, y, p["max_iterations"], batch_size=X.shape[0], eval_every=1,
                  progress=progress, seed=seed, desc=f"example network ({data}, batch K-FAC)",
                  callback=stop_at_target)
        except _Stop:
            pass
        return pd.DataFrame(rows), {"snapshots": snapshots}

    def build():
        torch.manual_seed(seed)
        return classifier(sizes)

    return _load_or_train(f"example-{data}-{preset}", config, build, run, "categorical", ds, cache_dir,
                          device, retrain, distributed)


def autoencoder_data(preset: str = "quick", data: str = "mnist", seed: int = 0) -> Dataset:
    """The autoencoder's training set for ``preset`` (targets = inputs): ``n_train`` cases of
    :data:`AUTOENCODER_PRESETS`, a subset drawn with ``seed``, of MNIST or (``data="digits"``) the 8×8 digits."""
    if preset not in AUTOENCODER_PRESETS:
        raise ValueError(f"preset must be one of {sorted(AUTOENCODER_PRESETS)}, got {preset!r}.")
    p = AUTOENCODER_PRESETS[preset]
    ds = load_dataset(data, "train")
    if len(ds) > p["n_train"]:
        ds = ds.subset(p["n_train"], seed=seed)
    return ds.autoencoder()


def autoencoder(preset: str = "quick", data: str = "mnist", *, cache_dir=None, device=None,
                progress: bool = True, retrain: bool = False, seed: int = 0, distributed=None) -> ZooEntry:
    """The deep autoencoder (Section 7) at its captured iteration of block-tridiagonal K-FAC (Figure 7).

    ``preset="paper"``: 784-1000-500-250-30-250-500-1000-784 on 50k MNIST cases, iteration 500 (GPU
    recommended). ``preset="quick"``: 784-250-100-30-100-250-784 on 10k cases, iteration 150, for 2 CPU
    cores. ``data="digits"`` swaps in the 8×8 digits (input width 64) for offline use. ``distributed``:
    data-parallel K-FAC over a process group (every rank loads the data and steps on its slice of each
    mini-batch; rank 0 writes the cache), as under ``torchrun ... -m kfac_lens.cli train autoencoder``.
    """
    if preset not in AUTOENCODER_PRESETS:
        raise ValueError(f"preset must be one of {sorted(AUTOENCODER_PRESETS)}, got {preset!r}.")
    p = dict(AUTOENCODER_PRESETS[preset])
    ds = autoencoder_data(preset, data, seed)
    sizes = [ds.X.shape[1]] + p["sizes"][1:-1] + [ds.X.shape[1]]
    if data == "digits":
        sizes = [64, 48, 24, 8, 24, 48, 64]
    device = torch.device(device) if device is not None else default_device()
    config = dict(kind="autoencoder", data=data, preset=preset, inverse="tridiag", seed=seed,
                  **{**p, "sizes": sizes})
    X = ds.X.to(device)
    n = X.shape[0]
    from .optim import exponential_batch_sizes
    sched = exponential_batch_sizes(min(p["m1"], n), n, p["full_at"])

    def run(model, opt):
        return train(model, opt, X, X, p["iterations"], batch_size=sched, eval_every=10, progress=progress,
                     seed=seed, desc=f"autoencoder ({preset}, tridiag K-FAC)")

    def build():
        return sparse_init_(autoencoder_net(sizes), seed=seed)

    return _load_or_train(f"autoencoder-{data}-{preset}", config, build, run, "bernoulli", ds, cache_dir,
                          device, retrain, distributed)


def training_comparison(preset: str = "quick", data: str = "mnist", *, iterations: int | None = None,
                        sgd_lr: float = 0.01, adam_lr: float = 3e-3, batch_size: int = 500, cache_dir=None,
                        device=None, progress: bool = True, retrain: bool = False,
                        seed: int = 0, seeds=None, baselines: bool = True) -> dict[str, pd.DataFrame]:
    """Histories of K-FAC (block-diagonal and block-tridiagonal, the paper's exponential batch schedule,
    ``iterations`` iterations) and the baselines SGD-Nesterov and Adam (fixed batch ``batch_size``, run for
    as much optimizer time as the slower K-FAC run) on the autoencoder problem. The default learning rates
    are those ``kfac-lens bench optimizer`` picks on its grids for batch 500 on the quick autoencoder
    (SGD-Nesterov 0.01, Adam 0.003, each grid's best interior); K-FAC keeps the preset's λ₀.

    ``seeds`` (e.g. ``(0, 1, 2)``) runs the comparison once per seed (each cached on its own) and stacks each
    method's histories with a ``seed`` column, which :func:`kfac_lens.figures.figure_training_curves` draws
    as the median with a min–max band. ``baselines=False`` trains only K-FAC's two inverses (Section 13's
    per-iteration comparison of block-diagonal and block-tridiagonal, when equal-time baselines cost too
    much, as for the paper preset on a CPU)."""
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("seeds: give at least one seed (or None for the single run of `seed`).")
        runs = [training_comparison(preset, data, iterations=iterations, sgd_lr=sgd_lr, adam_lr=adam_lr,
                                    batch_size=batch_size, cache_dir=cache_dir, device=device, progress=progress,
                                    retrain=retrain, seed=s, baselines=baselines) for s in seeds]
        return {name: pd.concat([r[name].assign(seed=s) for s, r in zip(seeds, runs)], ignore_index=True)
                for name in runs[0]}
    p = dict(AUTOENCODER_PRESETS[preset])
    iterations = iterations or p["iterations"]
    ds = autoencoder_data(preset, data, seed)
    sizes = [64, 48, 24, 8, 24, 48, 64] if data == "digits" else p["sizes"]
    device = torch.device(device) if device is not None else default_device()
    config = dict(kind="comparison", data=data, preset=preset, iterations=iterations, sgd_lr=sgd_lr,
                  adam_lr=adam_lr, batch_size=batch_size, seed=seed, sizes=sizes,
                  **{k: p[k] for k in ("m1", "full_at", "lambda_init", "eta", "n_train")})
    if not baselines:  # (only then in the cache key, so that the full comparisons keep theirs)
        config["baselines"] = False
    cache_dir = Path(cache_dir) if cache_dir is not None else default_zoo_dir()
    path = cache_dir / f"comparison-{data}-{preset}-{config_hash(config)}.pt"
    if path.exists() and not retrain:
        return load_checkpoint(path)["histories"]
    X = ds.X.to(device)
    n = X.shape[0]
    from .optim import exponential_batch_sizes
    sched = exponential_batch_sizes(min(p["m1"], n), n, p["full_at"])
    runs = {
        "K-FAC block-diagonal": (lambda m: KFAC(m, "bernoulli", "blockdiag", lambda_init=p["lambda_init"],
                                                eta=p["eta"], seed=seed), sched),
        "K-FAC block-tridiagonal": (lambda m: KFAC(m, "bernoulli", "tridiag", lambda_init=p["lambda_init"],
                                                   eta=p["eta"], seed=seed), sched),
        "SGD-Nesterov": (lambda m: SGDNesterov(m, "bernoulli", lr=sgd_lr, eta=p["eta"]), batch_size),
        "Adam": (lambda m: Adam(m, "bernoulli", lr=adam_lr, eta=p["eta"]), batch_size),
    }
    histories = {}
    budget = None
    for name, (make, bs) in runs.items():
        if not baselines and not name.startswith("K-FAC"):
            continue
        model = sparse_init_(autoencoder_net(sizes), seed=seed).to(device)
        if name.startswith("K-FAC"):
            histories[name] = train(model, make(model), X, X, iterations, batch_size=bs, eval_every=10,
                                    progress=progress, seed=seed, desc=name)
        else:  # the baselines get as much optimizer time as the slower K-FAC run
            budget = budget or max(float(h["time"].iloc[-1]) for h in histories.values())
            histories[name] = train(model, make(model), X, X, 10**7, batch_size=bs, eval_every=50,
                                    progress=progress, seed=seed, desc=f"{name} ({budget:.0f} s)",
                                    time_limit=budget)
    save_checkpoint(path, {"histories": histories, "config": config})
    return histories
