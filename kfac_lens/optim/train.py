"""The training loop shared by K-FAC and the baselines: batch-size schedules, progress, history, checkpoints.

Checkpoints are written atomically (temporary file in the same folder, fsync, then rename), so a crash
never leaves a corrupt checkpoint; on a non-finite loss the run stops with a clear error and the last
good checkpoint stays as it was.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..capture import all_finite, check_inputs
from ..errors import NonFiniteError
from ..likelihoods import Bernoulli, Categorical, Likelihood
from .schedules import exponential_batch_sizes


@torch.no_grad()
def evaluate(model, likelihood: Likelihood, X, y, chunk: int = 10000) -> dict:
    """Loss (mean NLL) and error on (X, y): classification error rate for categorical outputs, mean
    squared reconstruction/regression error Σ(mean − y)² per case otherwise (the paper's autoencoder error)."""
    loss, err, n = 0.0, 0.0, X.shape[0]
    for s in range(0, n, chunk):
        z = model(X[s:s + chunk])
        t = y[s:s + chunk]
        loss += float(likelihood.per_case_nll(z, t).sum())
        if isinstance(likelihood, Categorical):
            err += float((z.argmax(1) != t).sum())
        else:
            mean = torch.sigmoid(z) if isinstance(likelihood, Bernoulli) else z
            err += float(((mean - t) ** 2).sum())
    return {"loss": loss / n, "error": err / n}


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` with torch.save atomically: temp file in the same folder, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, map_location=None) -> dict:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no checkpoint at {path}; train first or pass resume=False.")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # corrupt file
        raise ValueError(f"checkpoint {path} cannot be read ({exc}); delete it and train again.") from exc


def _check_parameters(model, it: int, checkpoint) -> None:
    """Raise NonFiniteError when a parameter is NaN/Inf, so that such a state is never checkpointed."""
    if all_finite(model.parameters()):
        return
    where = f" The last good checkpoint is {checkpoint}." if checkpoint else ""
    raise NonFiniteError(f"the parameters contain NaN or Inf after iteration {it}; training has "
                         f"diverged.{where}")


def _batch_schedule(batch_size, n: int) -> Callable[[int], int]:
    if batch_size == "exponential":
        return exponential_batch_sizes(min(1000, n), n)
    if callable(batch_size):
        return batch_size
    if isinstance(batch_size, int) and batch_size > 0:
        return lambda k: batch_size
    raise ValueError(f"batch_size must be a positive int, 'exponential' or a callable of k, got {batch_size!r}.")


def train(model, optimizer, X, y, iterations: int, *, batch_size=1000, eval_X=None, eval_y=None,
          eval_every: int = 10, checkpoint=None, checkpoint_every: int = 50, resume: bool = False,
          progress: bool = True, seed: int = 0, time_limit: float | None = None, desc: str | None = None,
          callback=None) -> pd.DataFrame:
    """Train ``model`` with ``optimizer`` (K-FAC or a baseline: anything with ``step(x, y) -> dict``).

    ``batch_size``: an int, a callable of the 1-based iteration k, or "exponential" (Appendix M:
    m_k = min(1000·exp((k−1)/b), N) reaching N at k = 500). Mini-batches are drawn without replacement
    from a seeded generator. Every ``eval_every`` iterations the loss and error on (eval_X, eval_y)
    (default: the training data) are recorded. ``time`` is the cumulative optimizer wall-clock time,
    evaluation excluded. Returns the history as a DataFrame (also stored in the checkpoint).

    Data-parallel K-FAC (``KFAC(..., distributed=...)``): pass the whole (X, y) on every rank. Every rank
    draws the same mini-batch from the same seeded generator and steps on its slice ``idx[rank::world]``;
    the evaluation is split alike and averaged; only rank 0 writes checkpoints and shows progress.
    """
    lik = optimizer.likelihood
    view = optimizer.view
    shards = getattr(optimizer, "shards", None)
    rank, world = (shards.rank, shards.world_size) if shards is not None and shards.active else (0, 1)
    progress = progress and rank == 0
    X, y = check_inputs(view, X, y, what="the training inputs X")
    if eval_X is None:
        eval_X, eval_y = X, y
    else:
        eval_X, eval_y = check_inputs(view, eval_X, eval_y, what="eval_X")
    n = X.shape[0]
    sched = _batch_schedule(batch_size, n)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    rows: list[dict] = []
    start_it, elapsed = 1, 0.0
    if resume and checkpoint is not None and Path(checkpoint).exists():
        ck = load_checkpoint(checkpoint, map_location=view.device)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        gen.set_state(ck["data_generator"])
        rows = ck["history"].to_dict("records")
        start_it, elapsed = ck["iteration"] + 1, ck["elapsed"]

    def snapshot(it):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it,
                "elapsed": elapsed, "data_generator": gen.get_state(), "history": pd.DataFrame(rows)}

    bar = tqdm(range(start_it, iterations + 1), desc=desc or type(optimizer).__name__, disable=not progress,
               initial=start_it - 1, total=iterations)
    for it in bar:
        m = min(int(sched(it)), n)
        idx = torch.randperm(n, generator=gen)[:m].to(X.device) if m < n else torch.arange(n, device=X.device)
        idx = idx[rank::world]  # (one process: all of it)
        t0 = time.perf_counter()
        try:
            stats = optimizer.step(X[idx], y[idx])
        except NonFiniteError as exc:
            where = f" The last good checkpoint is {checkpoint}." if checkpoint else ""
            raise NonFiniteError(f"iteration {it} stopped: {exc}{where}") from exc
        elapsed += time.perf_counter() - t0
        _check_parameters(model, it, checkpoint)  # the loss is checked before the update, θ after it
        row = {**stats, "iteration": it, "time": elapsed}
        if it % eval_every == 0 or it == iterations or it == 1:
            ev = evaluate(model, lik, eval_X[rank::world], eval_y[rank::world])
            if world > 1:
                both = torch.tensor([ev["loss"], ev["error"]], dtype=torch.float64, device=eval_X.device)
                shards.mean_([both], eval_X[rank::world].shape[0])
                ev = {"loss": float(both[0]), "error": float(both[1])}
            row["eval_loss"], row["error"] = ev["loss"], ev["error"]
        rows.append(row)
        if progress and "error" in row:
            bar.set_postfix(loss=f"{row['loss']:.4g}", error=f"{row['error']:.4g}")
        if callback is not None:
            callback(it, row)
        if checkpoint is not None and (it % checkpoint_every == 0 or it == iterations):
            _check_parameters(model, it, checkpoint)  # (again: the callback may have changed them)
            if getattr(getattr(optimizer, "shards", None), "rank", 0) == 0:  # data-parallel K-FAC: rank 0 writes
                save_checkpoint(checkpoint, snapshot(it))
        if time_limit is not None and elapsed >= time_limit:
            break
    bar.close()
    return pd.DataFrame(rows)
