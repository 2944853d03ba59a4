"""Inspecting a user's own network: ``kfac-lens inspect FILE.py:FACTORY --weights CKPT.pt --data ...``.

Rebuild the model from a factory in a Python file, load a checkpoint, read the data in the shape the model
takes, and compute its :class:`~kfac_lens.study.CurvatureStudy`: the exact Fisher F against F̃ (Section 3,
docs/math.md §2–§3), the inverses F̆⁻¹ and F̂⁻¹ against F̃⁻¹ (Sections 3.2, 3.3; docs/math.md §5), and the
Appendix B cumulants of a pair of layers (docs/math.md §6). Every bad input raises :class:`InspectError`
(a ``ValueError``) that names the argument and the way out.

**Input shape rule.** Inputs are tried on the model in this order, on two cases: as stored (an ``.npz``
array of any shape; the built-in data sets are flat (N, D) rows), then, for flat rows, as (N, 1, H, W)
images (H × W the data set's image shape; for an ``.npz`` with flat rows, √D × √D), and for (N, H, W)
arrays as (N, 1, H, W). The first shape the model runs on is used.

**Default γ.** Without ``--gamma``, γ = 0.1·√(tr F / P): the factored Tikhonov damping adds about γ²I to the
curvature (docs/math.md §4), here 1% of F's mean eigenvalue.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .curvature.compare import block_errors, error_by_kind
from .errors import UnsupportedModelError
from .study import CurvatureStudy, Inverse

__all__ = ["InspectError", "Inspection", "default_gamma", "inspect_network", "load_factory",
           "load_inputs", "load_weights", "summary_table"]

#: The largest P the dense float64 analysis accepts (several P×P matrices are held at once).
MAX_PARAMS = 12_000
DATA_CHOICES = ("mnist", "digits")


class InspectError(ValueError):
    """A bad argument of ``kfac-lens inspect``; the message names it and the way out."""


# ------------------------------------------------------------------------------------------ the model
def load_factory(spec: str) -> nn.Module:
    """``FILE.py:FACTORY`` → ``FACTORY()``, which must return an ``nn.Module``."""
    path_text, sep, name = str(spec).rpartition(":")
    if not sep or not path_text or not name:
        raise InspectError(f"MODEL {spec!r} must be FILE.py:FACTORY, e.g. mynet.py:make_model "
                           "(a callable in FILE.py that returns the nn.Module).")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise InspectError(f"MODEL: the file {str(path)!r} does not exist; pass the path of the Python file "
                           "that defines the factory, as FILE.py:FACTORY.")
    mod_name = f"kfac_lens_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec_obj = importlib.util.spec_from_file_location(mod_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise InspectError(f"MODEL: {str(path)!r} cannot be imported as a Python module; pass a .py file.")
    module = importlib.util.module_from_spec(spec_obj)
    sys.path.insert(0, str(path.resolve().parent))  # the file may import its neighbours
    try:
        spec_obj.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.resolve().parent))
    factory = getattr(module, name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items()
                       if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == mod_name)
        raise InspectError(f"MODEL: {str(path)!r} has no callable {name!r}; its callables are "
                           f"{', '.join(found) or 'none'}. Pass FILE.py:FACTORY with one of them.")
    model = factory()
    if not isinstance(model, nn.Module):
        raise InspectError(f"MODEL: {name}() returned a {type(model).__name__}, not an nn.Module; the factory "
                           "must return the network (e.g. `return MyNet()`).")
    return model


def _state_dict_of(obj, where: str) -> dict:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict | nn.Module):
                return _state_dict_of(obj[key], where)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise InspectError(f"--weights {where} holds a {type(obj).__name__} that is not a state dict; save "
                       "torch.save(model.state_dict(), PATH) or torch.save({'model': model.state_dict()}, PATH).")


def load_weights(model: nn.Module, path, device=None) -> nn.Module:
    """Load a state dict (plain, or under a ``"model"`` key) into ``model``, mapped onto ``device``.

    Raises :class:`InspectError` naming the missing, unexpected and mis-shaped keys when it does not fit.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InspectError(f"--weights: the file {str(path)!r} does not exist; pass the checkpoint written by "
                           "torch.save(model.state_dict(), PATH).")
    device = torch.device("cpu") if device is None else torch.device(device)
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same way out
        raise InspectError(f"--weights {str(path)!r} cannot be read by torch.load ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}); pass a file written by torch.save.") from exc
    state = _state_dict_of(obj, repr(str(path)))
    own = model.state_dict()
    if state and not any(k in own for k in state) and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel / DDP
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {missing}"] if missing else []) + \
                ([f"unexpected keys {unexpected}"] if unexpected else []) + \
                ([f"shape mismatches: {'; '.join(shapes)}"] if shapes else [])
        raise InspectError(f"--weights {str(path)!r} does not fit the model: {'; '.join(parts)}. Pass the "
                           "checkpoint saved from the network this factory builds, or change the factory to match.")
    model.load_state_dict(state)
    return model.to(device)


# ------------------------------------------------------------------------------------------ the data
@dataclass
class Inputs:
    """The data as the model takes it: ``X`` (N, ...), labels ``y`` or None, and how X was shaped."""

    X: torch.Tensor
    y: torch.Tensor | None
    name: str
    shape_note: str


def _raw_data(data: str):
    """(X, y, image_shape or None, name) of ``mnist`` (16×16), ``digits`` (8×8) or an ``.npz`` file."""
    if data in DATA_CHOICES:
        from .data import load_dataset
        ds = load_dataset("mnist16" if data == "mnist" else "digits", "train")
        return ds.X, ds.y, tuple(ds.image_shape), ds.name
    path = Path(data).expanduser()
    if path.suffix != ".npz" or not path.is_file():
        raise InspectError(f"--data {data!r} is neither mnist, digits nor an existing .npz file; pass one of "
                           "those (an .npz with an array X of inputs and optionally y).")
    with np.load(path) as arrays:
        if "X" not in arrays:
            raise InspectError(f"--data {data!r} has arrays {sorted(arrays)} but no 'X'; save it with "
                               "np.savez(PATH, X=inputs, y=targets).")
        X = torch.from_numpy(np.asarray(arrays["X"], dtype=np.float32))
        y = torch.from_numpy(np.asarray(arrays["y"])) if "y" in arrays else None
    if X.ndim < 2 or not len(X):
        raise InspectError(f"--data {data!r}: X has shape {tuple(X.shape)}; it needs cases first, (N, ...).")
    return X, y, None, path.stem


def _candidate_shapes(X: torch.Tensor, image_shape) -> list[tuple[str, torch.Tensor]]:
    out = [(f"as stored, {tuple(X.shape[1:])} per case", X)]
    if X.ndim == 2:
        side = math.isqrt(X.shape[1])
        hw = image_shape or ((side, side) if side * side == X.shape[1] else None)
        if hw is not None:
            out.append((f"as (N, 1, {hw[0]}, {hw[1]}) images", X.reshape(len(X), 1, *hw)))
    elif X.ndim == 3:
        out.append((f"as (N, 1, {X.shape[1]}, {X.shape[2]}) images", X[:, None]))
    return out


def load_inputs(data: str, model: nn.Module, cases: int | None = None, device=None) -> Inputs:
    """The first ``cases`` cases of ``data``, shaped by the module docstring's rule so that ``model`` runs."""
    X, y, image_shape, name = _raw_data(data)
    if cases is not None:
        X = X[:cases]
        y = None if y is None else y[:cases]
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    X = X.to(device=device, dtype=dtype)
    tried = []
    for note, cand in _candidate_shapes(X, image_shape):
        try:
            with torch.no_grad():
                model(cand[:2])
        except Exception as exc:  # noqa: BLE001 - a wrong width shows up as any error inside forward
            tried.append(f"{note}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        return Inputs(cand, None if y is None else y.to(device), name, note)
    raise InspectError(f"--data {data}: the model runs on none of the shapes tried for its {tuple(X.shape)} "
                       f"inputs ({' | '.join(tried)}). Pass data of the width the model was trained on, or an "
                       ".npz whose X has the exact per-case shape the model takes.")


# ------------------------------------------------------------------------------------------ the analysis
def default_gamma(study: CurvatureStudy) -> float:
    """γ = 0.1·√(tr F / P): damping of about 1% of F's mean eigenvalue (module docstring)."""
    return 0.1 * math.sqrt(max(float(torch.trace(study.F)) / study.n_params, 0.0)) or 1e-3


def cumulant_pair(study: CurvatureStudy) -> tuple[int, int] | None:
    """The first two neighbouring selected layers used once per case (Appendix B needs single uses)."""
    for k, l in zip(study.layers[:-1], study.layers[1:]):
        if all(study.view.layers[j].uses in (None, 1) for j in (k, l)):
            return k, l
    return None


def error_tables(study: CurvatureStudy, gamma: float) -> pd.DataFrame:
    """Per-block relative errors (overall and every block) of F̃ vs F and of F̆⁻¹, F̂⁻¹ vs F̃⁻¹ at γ."""
    parts = [block_errors(study.F_tilde, study.F, study.sizes, study.labels, name="F̃ vs F").assign(gamma=0.0)]
    ref = study.F_tilde_inverse(gamma)
    for inv in (Inverse.BLOCK_DIAGONAL, Inverse.BLOCK_TRIDIAGONAL):
        df = block_errors(study.inverse(inv, gamma), ref, study.sizes, study.labels, name=f"{inv.label} vs F̃⁻¹")
        parts.append(df.assign(gamma=float(gamma)))
    return pd.concat(parts, ignore_index=True)


def summary_table(study: CurvatureStudy, gamma: float) -> pd.DataFrame:
    """One row per comparison: the overall error, pooled by block kind, and on each diagonal block."""
    pairs = [("F̃ vs F", study.F_tilde, study.F)]
    ref = study.F_tilde_inverse(gamma)
    pairs += [(f"{inv.label.split()[0]} vs F̃⁻¹", study.inverse(inv, gamma), ref)
              for inv in (Inverse.BLOCK_DIAGONAL, Inverse.BLOCK_TRIDIAGONAL)]
    rows = []
    for name, approx, reference in pairs:
        kinds = error_by_kind(approx, reference, study.sizes, name=name).set_index("kind")["rel_error"]
        per = block_errors(approx, reference, study.sizes, study.labels, name=name)
        diag = per[(per.block_row == per.block_col) & (per.kind != "overall")]
        rows.append({"comparison": name, **kinds.to_dict(),
                     **{f"{r}": v for r, v in zip(diag.block_row, diag.rel_error)}})
    return pd.DataFrame(rows).set_index("comparison")


@dataclass
class Inspection:
    """What :func:`inspect_network` computed: the study, γ, the figures (name → DrawnFigure), the metrics
    table, the printed summary, and notes (what was chosen or skipped, and why)."""

    study: CurvatureStudy
    gamma: float
    figures: dict = field(default_factory=dict)
    metrics: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def inspect_network(model: nn.Module, inputs: Inputs, likelihood: str = "categorical", layers=None,
                    gamma: float | None = None, approx: str | None = None) -> Inspection:
    """The study of ``model`` on ``inputs`` and its Figures 5, 6, exact-vs-K-FAC and cumulants, with metrics.

    ``approx`` None: "expand" when the selected layers have equally many uses per case, else "reduce"
    (KFAC-expand pairs two layers' uses only when their numbers agree; docs/math.md §3).
    """
    from . import figures as F
    from .nets import NetworkView

    model.eval()
    view = NetworkView(model, example_input=inputs.X[:2], warn=False)
    notes = [f"inputs {inputs.shape_note}; {len(inputs.X)} cases of {inputs.name}"]
    if view.fixed:
        notes.append(f"held fixed (not analysed): {', '.join(view.fixed)}")
    sel = view.select(layers)
    P = view.n_params(sel)
    if P > MAX_PARAMS:
        raise InspectError(f"--layers: the selected layers {sel} have P = {P} parameters, more than the "
                           f"{MAX_PARAMS} the dense P×P analysis holds; choose fewer with --layers (e.g. "
                           f"--layers {' '.join(str(k) for k in sel[-2:])}).\n{view.summary()}")
    if approx is None:
        uses = {view.layers[k].uses for k in sel}
        approx = "expand" if len(uses) == 1 else "reduce"
        if approx == "reduce":
            notes.append("approx=reduce: the selected layers have different numbers of uses per case "
                         f"({sorted(u for u in uses if u is not None)}), which KFAC-expand cannot pair")
    y = inputs.y if likelihood == "categorical" else None
    study = CurvatureStudy(view, inputs.X, y, likelihood, layers=sel, approx=approx,
                           name=f"{type(model).__name__}")
    g = float(gamma) if gamma is not None else default_gamma(study)
    result = Inspection(study, g, notes=notes)
    result.figures["figure5"] = F.figure5(study)
    result.figures["figure6"] = F.figure6(study, g)
    result.figures["figure_exact_vs_kfac"] = F.figure_exact_vs_kfac(study)
    pair = cumulant_pair(study)
    if pair is None:
        notes.append("cumulants skipped: no two neighbouring selected layers are used once per case "
                     "(Appendix B's decomposition needs single uses; select such layers with --layers)")
    else:
        try:
            result.figures["figure_cumulants"] = F.figure_cumulants(study, None, None, *pair)
        except (UnsupportedModelError, ValueError) as exc:
            notes.append(f"cumulants skipped: {exc}")
    ids = {"figure5": "5", "figure6": "6", "figure_exact_vs_kfac": "exact", "figure_cumulants": "cumulants"}
    tables = [d.metrics.assign(figure=ids[n]) for n, d in result.figures.items()]
    tables.append(error_tables(study, g).assign(figure="summary"))
    result.metrics = pd.concat(tables, ignore_index=True, sort=False)
    result.summary = summary_table(study, g)
    return result


def write_outputs(result: Inspection, out) -> list[Path]:
    """Save the figures as PNGs and the metrics as ``metrics.csv`` into ``out``; the paths written."""
    from .figures import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [save_figure(d.figure, out / f"{name}.png") for name, d in result.figures.items()]
    path = out / "metrics.csv"
    result.metrics.to_csv(path, index=False)
    return [*map(Path, written), path]
