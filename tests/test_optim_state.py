"""Resuming and failing safely: KFAC.state_dict, train(checkpoint=, resume=), non-finite loss, atomic save."""

from __future__ import annotations

import copy
import io
import math

import pandas as pd
import pytest
import torch
from torch import nn

import kfac_lens as K
from kfac_lens.optim import KFAC, SGDNesterov, load_checkpoint, save_checkpoint, train

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def make_problem(seed=0, n=48):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    return net, X, y


def kfac(net, inverse="blockdiag", **kw):
    # short periods so that the resumed segment contains λ updates, γ searches and inverse refreshes
    base = {"lambda_init": 1.0, "T1": 2, "T2": 4, "T3": 2, "seed": 3}
    base.update(kw)
    return KFAC(net, "categorical", inverse, **base)


def batch_list(X, y, n, m=16, seed=9):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randperm(X.shape[0], generator=g)[:m]
        out.append((X[idx], y[idx]))
    return out


def params(net):
    return [p.detach().clone() for p in net.parameters()]


# --------------------------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
def test_state_dict_round_trip_resumes_bit_identically(inverse):
    net, X, y = make_problem()
    opt = kfac(net, inverse)
    bs = batch_list(X, y, 15)
    for xb, yb in bs[:7]:
        opt.step(xb, yb)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    stats_a, params_a = [], []
    for xb, yb in bs[7:]:
        stats_a.append(opt.step(xb, yb))
        params_a.append(params(net))

    net2, _, _ = make_problem(seed=42)  # different initial weights: everything must come from the save
    opt2 = kfac(net2, inverse, seed=123)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    net2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.k == 8
    for (xb, yb), sa, pa in zip(bs[7:], stats_a, params_a):
        sb = opt2.step(xb, yb)
        for p, q in zip(pa, params(net2)):
            assert torch.equal(p, q)
        for key in ("iteration", "loss", "objective", "lambda", "gamma", "alpha", "mu", "M",
                    "inverse_refreshed"):
            assert sa[key] == sb[key], key
        assert (math.isnan(sa["rho"]) and math.isnan(sb["rho"])) or sa["rho"] == sb["rho"]
    # the resumed segment exercised the adaptive parts
    assert any(s["inverse_refreshed"] for s in stats_a) and any(not math.isnan(s["rho"]) for s in stats_a)
    assert len({s["gamma"] for s in stats_a}) > 1 or len({s["lambda"] for s in stats_a}) > 1


def _saved(net, opt, how):
    """A checkpoint of (model, optimizer) that shares nothing with the live run."""
    state = {"model": net.state_dict(), "opt": opt.state_dict()}
    if how == "deepcopy":
        return copy.deepcopy(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _restored(saved):
    return torch.load(io.BytesIO(saved), weights_only=False) if isinstance(saved, bytes) else saved


def _check_resume_after_every_iteration(inverse, T2, **cfg):
    """Save after each iteration k = 1 … 2·T₂, resume each save in a fresh model and optimizer, run to
    2·T₂ + 2: every weight, λ and γ equal the uninterrupted run's bit for bit."""
    assert torch.get_num_threads() == 1  # both runs use the same kernels (single_thread fixture)
    n_iter = 2 * T2 + 2
    cfg = {"T1": 2, "T2": T2, "T3": T2, **cfg}
    net, X, y = make_problem()
    opt = kfac(net, inverse, **cfg)
    bs = batch_list(X, y, n_iter, m=32)
    saves, stats = {}, []
    for k, (xb, yb) in enumerate(bs, start=1):
        stats.append(opt.step(xb, yb))
        if k <= 2 * T2:
            saves[k] = _saved(net, opt, "bytes" if k % 2 else "deepcopy")
    final = params(net)
    # the run exercised what a resume has to carry: λ moves, inverse refreshes and γ searches
    assert len({s["lambda"] for s in stats}) > 1
    assert [s["inverse_refreshed"] for s in stats] == [k <= 3 or k % cfg["T3"] == 0 for k in range(1, n_iter + 1)]

    for k, saved in saves.items():
        net2, _, _ = make_problem(seed=42)  # other initial weights: everything must come from the save
        opt2 = kfac(net2, inverse, **{**cfg, "seed": 123, "lambda_init": 7.0})
        ck = _restored(saved)
        net2.load_state_dict(ck["model"])
        opt2.load_state_dict(ck["opt"])
        assert opt2.k == k + 1
        for i in range(k, n_iter):
            st = opt2.step(*bs[i])
            ref = stats[i]
            assert (st["lambda"], st["gamma"], st["alpha"], st["mu"], st["M"]) == \
                (ref["lambda"], ref["gamma"], ref["alpha"], ref["mu"], ref["M"]), \
                f"resumed after iteration {k}, differs at iteration {i + 1}"
        for p, q in zip(final, params(net2)):
            assert torch.equal(p, q), f"resumed after iteration {k}"
        assert (opt2.lam, opt2.gamma, opt2.k) == (opt.lam, opt.gamma, opt.k), f"resumed after iteration {k}"


@pytest.mark.parametrize("momentum", [True, False], ids=["momentum", "no-momentum"])
@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
def test_resume_after_every_iteration_is_bit_identical(inverse, momentum):
    """Saves right after a γ search (k = T₂, 2·T₂: the block-diagonal inverse then comes from the shared
    eigendecomposition, not Cholesky), after other refreshes (k ≤ 3) and in between all resume exactly."""
    _check_resume_after_every_iteration(inverse, T2=4, momentum=momentum)


@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
def test_resume_rebuilds_the_inverse_with_the_pi_it_was_built_with(inverse):
    """π given as a callable of k: the live inverse keeps the π of its refresh iteration, also on resume."""
    _check_resume_after_every_iteration(inverse, T2=4, pi=lambda k: 1.0 + (k % 3) / 2)


def test_in_memory_state_dict_is_a_snapshot():
    """A state_dict taken in memory (no serialisation) must not change as the optimizer keeps going, and two
    optimizers loaded from it must not share (and corrupt) each other's factors."""
    net, X, y = make_problem()
    opt = kfac(net, T3=1)
    bs = batch_list(X, y, 8)
    for xb, yb in bs[:4]:
        opt.step(xb, yb)
    sd = opt.state_dict()
    frozen = copy.deepcopy(sd)
    net_b, net_c = copy.deepcopy(net), copy.deepcopy(net)
    opt_b, opt_c = kfac(net_b, T3=1), kfac(net_c, T3=1)
    opt_b.load_state_dict(sd)
    opt_c.load_state_dict(sd)
    for xb, yb in bs[4:]:
        sa, sb, sc = opt.step(xb, yb), opt_b.step(xb, yb), opt_c.step(xb, yb)
        assert sa["alpha"] == sb["alpha"] == sc["alpha"]
    for key in ("A", "G"):
        for blk, t in sd["factors"][key].items():
            assert torch.equal(t, frozen["factors"][key][blk])
    for p, q, r in zip(params(net), params(net_b), params(net_c)):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_load_state_dict_rejects_another_inverse_kind():
    net, X, y = make_problem()
    opt = kfac(net, "blockdiag")
    opt.step(X, y)
    with pytest.raises(ValueError, match="inverse"):
        kfac(copy.deepcopy(net), "tridiag").load_state_dict(opt.state_dict())


# --------------------------------------------------------------------------------------------- train + resume
def _train(net, opt, X, y, iterations, **kw):
    return train(net, opt, X, y, iterations, batch_size=16, eval_every=3, progress=False, seed=11, **kw)


@pytest.mark.parametrize("which", ["kfac", "sgd"])
def test_train_resume_equals_uninterrupted_run(tmp_path, which):
    def make():
        net, X, y = make_problem()
        opt = kfac(net) if which == "kfac" else SGDNesterov(net, "categorical", lr=0.05)
        return net, opt, X, y

    net_a, opt_a, X, y = make()
    hist_a = _train(net_a, opt_a, X, y, 20)

    ck = tmp_path / "run.pt"
    net_b, opt_b, _, _ = make()
    hist_b1 = _train(net_b, opt_b, X, y, 10, checkpoint=ck, checkpoint_every=4)
    assert len(hist_b1) == 10 and load_checkpoint(ck)["iteration"] == 10  # saved at the last iteration
    net_c, opt_c, _, _ = make()
    with torch.no_grad():
        for p in net_c.parameters():
            p.add_(1.0)  # the resumed run must take everything from the checkpoint
    hist_c = _train(net_c, opt_c, X, y, 20, checkpoint=ck, checkpoint_every=4, resume=True)

    assert list(hist_c["iteration"]) == list(range(1, 21))
    assert list(hist_c["loss"]) == list(hist_a["loss"])  # bit-for-bit
    assert list(hist_c["batch_size"]) == list(hist_a["batch_size"])
    for p, q in zip(params(net_a), params(net_c)):
        assert torch.equal(p, q)
    assert load_checkpoint(ck)["iteration"] == 20
    # resuming a finished run does nothing more
    hist_d = _train(net_c, opt_c, X, y, 20, checkpoint=ck, resume=True)
    assert len(hist_d) == 20 and list(hist_d["loss"]) == list(hist_a["loss"])


def test_resume_without_checkpoint_file_starts_fresh(tmp_path):
    net, X, y = make_problem()
    hist = _train(net, kfac(net), X, y, 3, checkpoint=tmp_path / "none.pt", resume=True)
    assert list(hist["iteration"]) == [1, 2, 3]
    with pytest.raises(ValueError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


# --------------------------------------------------------------------------------------------- non-finite
def test_nan_in_training_data_is_rejected_before_any_step():
    net, X, y = make_problem()
    X = X.clone()
    X[5, 2] = float("nan")
    opt = kfac(net)
    before = params(net)
    with pytest.raises(K.NonFiniteError) as err:
        _train(net, opt, X, y, 5)
    assert isinstance(err.value, ValueError) and "NaN" in str(err.value)
    assert opt.k == 1 and opt.factors is None
    for p, q in zip(before, params(net)):
        assert torch.equal(p, q)
    with pytest.raises(K.NonFiniteError):
        opt.step(X[:8], y[:8])


def test_nan_weights_mid_run_stop_with_the_last_good_checkpoint(tmp_path):
    net, X, y = make_problem()
    opt = kfac(net)
    ck = tmp_path / "ck.pt"

    def poison(it, row):
        if it == 7:
            with torch.no_grad():
                net[0].weight[0, 0] = float("nan")

    with pytest.raises(K.NonFiniteError) as err:
        _train(net, opt, X, y, 20, checkpoint=ck, checkpoint_every=5, callback=poison)
    msg = str(err.value)
    assert str(ck) in msg and "checkpoint" in msg and "iteration 8" in msg
    state = load_checkpoint(ck)
    assert state["iteration"] == 5
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert len(state["history"]) == 5
    # and it resumes from there (after the caller fixes the cause)
    net2, _, _ = make_problem(seed=1)
    hist = _train(net2, kfac(net2), X, y, 6, checkpoint=ck, resume=True)
    assert list(hist["iteration"]) == list(range(1, 7)) and math.isfinite(hist["loss"].iloc[-1])


@pytest.mark.parametrize("where", ["update", "callback"])
def test_non_finite_parameters_are_never_checkpointed(tmp_path, where):
    """The loss of step k is finite (it is computed before the update), but the update itself makes θ
    non-finite — at a checkpoint iteration. The checkpoint on disk must stay the last good one."""
    net, X, y = make_problem()
    opt = kfac(net)
    ck = tmp_path / "ck.pt"
    combine = opt._combine

    def bad_combine(*a, **kw):
        p = combine(*a, **kw)
        if opt.k == 10:
            p.delta = [d * float("nan") for d in p.delta]
        return p

    def poison(it, row):
        if it == 10:
            with torch.no_grad():
                net[2].bias[0] = float("inf")

    if where == "update":
        opt._combine = bad_combine
    with pytest.raises(K.NonFiniteError) as err:
        _train(net, opt, X, y, 20, checkpoint=ck, checkpoint_every=5,
               callback=poison if where == "callback" else None)
    assert str(ck) in str(err.value)
    state = load_checkpoint(ck)
    assert state["iteration"] == 5
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_diverging_sgd_stops_with_a_clear_error(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).to(F64)  # linear net: the loss can blow up
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=g, dtype=F64) * 5
    y = torch.randn(32, 2, generator=g, dtype=F64)
    opt = SGDNesterov(net, "gaussian", lr=1e3, momentum=0.9)
    ck = tmp_path / "sgd.pt"
    with pytest.raises(K.NonFiniteError) as err:
        train(net, opt, X, y, 200, batch_size=32, checkpoint=ck, checkpoint_every=1, progress=False)
    assert str(ck) in str(err.value) and "learning rate" in str(err.value)
    state = load_checkpoint(ck)
    last = state["iteration"]
    assert last >= 1 and last == opt.k - 1  # the checkpoint is the last completed iteration
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert state["history"]["loss"].map(math.isfinite).all()


# --------------------------------------------------------------------------------------------- atomic save
def test_crash_during_save_keeps_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    good = {"iteration": 3, "x": torch.arange(5.0)}
    save_checkpoint(path, good)
    raw = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *a, **kw):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"iteration": 4, "x": torch.zeros(5)})
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == raw
    assert load_checkpoint(path)["iteration"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]

    # a KeyboardInterrupt mid-write cleans up too
    def interrupted_save(obj, f, *a, **kw):
        f.write(b"xx")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iteration": 5})
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"] and load_checkpoint(path)["iteration"] == 3


def test_crash_during_save_inside_train(tmp_path, monkeypatch):
    net, X, y = make_problem()
    opt = kfac(net)
    ck = tmp_path / "ck.pt"
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (iteration 4) dies half-way
            f.write(b"torn")
            raise OSError("power cut")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError):
        _train(net, opt, X, y, 10, checkpoint=ck, checkpoint_every=2)
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(ck)
    assert state["iteration"] == 2 and isinstance(state["history"], pd.DataFrame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(path)


def test_state_saved_on_another_kind_of_device_resumes_with_a_warning():
    """A CUDA generator's state (16 bytes) cannot seed a CPU generator (and vice versa): loading such a state
    continues from a stream seeded from it, reproducibly, and says so."""
    net, X, y = make_problem()
    opt = kfac(net)
    for xb, yb in batch_list(X, y, 3):
        opt.step(xb, yb)
    sd = opt.state_dict()
    assert sd["generator_device"] == "cpu"
    cuda_like = {**sd, "generator": torch.arange(16, dtype=torch.uint8), "generator_device": "cuda"}
    draws = []
    for _ in range(2):
        other = kfac(copy.deepcopy(net))
        with pytest.warns(RuntimeWarning, match="saved on cuda .* not bit-identical"):
            other.load_state_dict(cuda_like)
        draws.append(torch.randperm(100, generator=other.generator))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], torch.randperm(100, generator=torch.Generator().manual_seed(3)))
