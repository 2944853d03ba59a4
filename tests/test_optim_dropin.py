"""K-FAC as a drop-in torch.optim.Optimizer: an ordinary loop (forward, loss, backward, step) trains with it.

The drop-in step reads the gradient from ``.grad`` (the user's loss divided by its constant c: 1 for
CrossEntropyLoss, 1/C for BCEWithLogitsLoss, 2/C for MSELoss) and the Linear inputs recorded during the
user's forward pass; ``step(x, y)`` runs its own forward/backward pass. Both draw the same random stream
(S₁, sampled targets, S₂) and compute the factor statistics on S₁ alike, so every rule agrees; the iterates
agree to rounding (1e-12 relative), not bit for bit, because the two gradients are summed in another order:
torch's mean over m·C loss entries times 1/c, against the mean over cases of the per-case sums.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kfac_lens
from kfac_lens.optim import KFAC

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
LOSSES = {"categorical": nn.CrossEntropyLoss, "bernoulli": nn.BCEWithLogitsLoss, "gaussian": nn.MSELoss}


def problem(likelihood, n=64, seed=0):
    torch.manual_seed(seed)
    C = 5 if likelihood == "bernoulli" else 3
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, C)).to(F64)
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(n, 4, generator=g, dtype=F64)
    y = {"categorical": lambda: torch.randint(0, C, (n,), generator=g),
         "bernoulli": lambda: torch.rand(n, C, generator=g, dtype=F64),
         "gaussian": lambda: torch.randn(n, C, generator=g, dtype=F64)}[likelihood]()
    return net, X, y


def batches(X, y, n_steps, m=32, seed=9):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        idx = torch.randperm(X.shape[0], generator=g)[:m]
        yield X[idx], y[idx]


def rel(a, b):
    return float((a - b).norm() / b.norm())


# short periods: the compared run contains λ updates, γ searches and inverse refreshes
SHORT = {"lambda_init": 1.0, "T1": 2, "T2": 4, "T3": 2, "seed": 3}


@pytest.mark.parametrize("inverse", ["blockdiag", "tridiag"])
@pytest.mark.parametrize("likelihood", list(LOSSES))
def test_dropin_loop_gives_the_iterates_of_step_xy(likelihood, inverse):
    net, X, y = problem(likelihood)
    net_ref = copy.deepcopy(net)
    loss_fn = LOSSES[likelihood]()
    opt = kfac_lens.KFAC(net, loss_fn, inverse, **SHORT)  # the one changed line of an ordinary loop
    ref = KFAC(net_ref, likelihood, inverse, **SHORT)
    lams, gammas = set(), set()
    for xb, yb in batches(X, y, 10):
        opt.zero_grad()
        loss = loss_fn(net(xb), yb)
        loss.backward()
        st = opt.step()
        sr = ref.step(xb, yb)
        # the user's loss is c · mean NLL; K-FAC reports and minimises the mean NLL
        c = {"categorical": 1.0, "bernoulli": 1 / 5, "gaussian": 2 / 3}[likelihood]
        assert st["loss"] == pytest.approx(float(loss.detach()) / c, rel=1e-13)
        assert (st["lambda"], st["gamma"], st["inverse_refreshed"]) == (sr["lambda"], sr["gamma"],
                                                                         sr["inverse_refreshed"])
        for key in ("loss", "objective", "alpha", "mu", "M"):
            assert st[key] == pytest.approx(sr[key], rel=1e-11, abs=1e-15), key
        for p, q in zip(net.parameters(), net_ref.parameters()):
            assert rel(p.detach(), q.detach()) < 1e-12
        for blk in opt.factors.pairs:  # same S₁ and sampled targets: equal factors at θ₁, then to rounding
            for a, b in ((opt.factors.A[blk], ref.factors.A[blk]), (opt.factors.G[blk], ref.factors.G[blk])):
                assert torch.equal(a, b) if st["iteration"] == 1 else rel(a, b) < 1e-12
        lams.add(st["lambda"])
        gammas.add(st["gamma"])
    assert len(lams) > 1 and len(gammas) > 1  # the adaptive rules acted


def test_closure_step_returns_the_loss_and_equals_step_xy():
    net, X, y = problem("categorical")
    net_ref = copy.deepcopy(net)
    loss_fn = nn.CrossEntropyLoss()
    opt, ref = KFAC(net, loss_fn, **SHORT), KFAC(net_ref, "categorical", **SHORT)
    for xb, yb in batches(X, y, 5):
        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            out = loss_fn(net(xb), yb)
            out.backward()
            return out

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        assert float(loss.detach()) == pytest.approx(ref.step(xb, yb)["loss"], rel=1e-13)
    for p, q in zip(net.parameters(), net_ref.parameters()):
        assert rel(p.detach(), q.detach()) < 1e-12


def test_kfac_is_a_torch_optimizer():
    net, X, y = problem("categorical")
    opt = kfac_lens.KFAC(net, nn.CrossEntropyLoss())
    assert kfac_lens.KFAC is KFAC and "KFAC" in kfac_lens.__all__
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 1.0
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in net.parameters()}
    nn.CrossEntropyLoss()(net(X), y).backward()
    assert all(p.grad is not None for p in net.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    assert opt.likelihood.name == "categorical"
    with pytest.raises(ValueError, match="one parameter group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_lr_scales_the_step_and_follows_a_scheduler():
    """lr scales δ (after re-scaling and momentum); M of the step taken is lr(2 − lr)·M(δ); an lr scheduler
    drives it through param_groups and state_dict carries it."""
    net, X, y = problem("gaussian")
    net_half = copy.deepcopy(net)
    full, half = KFAC(net, "gaussian", seed=1), KFAC(net_half, "gaussian", seed=1)
    sched = torch.optim.lr_scheduler.LambdaLR(half, lambda epoch: 0.5)
    assert half.lr == 0.5
    w0 = [p.detach().clone() for p in net.parameters()]
    sf, sh = full.step(X, y), half.step(X, y)
    sched.step()
    for p, q, w in zip(net.parameters(), net_half.parameters(), w0):
        assert rel(q.detach() - w, 0.5 * (p.detach() - w)) < 1e-12
    assert sh["alpha"] == pytest.approx(sf["alpha"], rel=1e-12)
    assert sh["M"] == pytest.approx(0.75 * sf["M"], rel=1e-12)
    assert rel(half.delta0[0], 0.5 * full.delta0[0]) < 1e-12  # δ₀ is the step taken
    sd = half.state_dict()
    other = KFAC(copy.deepcopy(net_half), "gaussian")
    other.load_state_dict(sd)
    assert other.lr == 0.5
    for bad in (0.0, 2.0, -1.0):
        half.param_groups[0]["lr"] = bad
        with pytest.raises(ValueError, match="lr"):
            half.step(X, y)
    with pytest.raises(ValueError, match="lr"):
        KFAC(net, "gaussian", lr=3.0)


@pytest.mark.parametrize("loss_fn", [nn.L1Loss(), nn.NLLLoss(), nn.BCELoss(), nn.CrossEntropyLoss(reduction="sum"),
                                     nn.MSELoss(reduction="none"), nn.CrossEntropyLoss(label_smoothing=0.1),
                                     nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)),
                                     nn.CrossEntropyLoss(weight=torch.ones(3))],
                         ids=lambda f: repr(f))
def test_unsupported_losses_are_refused_naming_the_supported_ones(loss_fn):
    net, _, _ = problem("categorical")
    with pytest.raises(ValueError, match="CrossEntropyLoss, nn.BCEWithLogitsLoss or nn.MSELoss"):
        KFAC(net, loss_fn)


def test_dropin_step_explains_what_is_missing():
    net, X, y = problem("categorical")
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(net, loss_fn)
    with pytest.raises(ValueError, match="no forward pass"):
        opt.step()
    net(X)
    with pytest.raises(ValueError, match="not called on the model's output"):
        opt.step()
    loss_fn(net(X) + 0.0, y).backward()
    with pytest.raises(ValueError, match="another tensor"):
        opt.step()
    loss_fn(net(X), y)
    with pytest.raises(ValueError, match="backward"):
        opt.step()
    net(X)
    loss_fn(net(X), y).backward()
    with pytest.raises(ValueError, match="2 forward passes"):
        opt.step()
    with pytest.raises(ValueError, match="inputs x"):
        opt.step(y=y)
    assert opt.k == 1 and opt.factors is None  # nothing was taken
    # evaluation passes without autograd (and the optimizer's own passes) are not the training batch
    opt.zero_grad()
    loss_fn(net(X), y).backward()
    with torch.no_grad():
        loss_fn(net(X[:5]), y[:5])
    assert opt.step()["batch_size"] == X.shape[0]
    # a likelihood name has no loss module to follow
    with pytest.raises(ValueError, match="torch loss module"):
        KFAC(copy.deepcopy(net), "categorical").step()
    opt.remove_hooks()
    loss_fn(net(X), y).backward()
    with pytest.raises(ValueError, match="torch loss module"):
        opt.step()
    assert opt.step(X, y)["iteration"] == 2  # step(x, y) still works


def test_a_deep_copy_is_an_independent_optimizer_with_its_own_hooks():
    """torch.optim.Optimizer pickles only defaults, state and param_groups; KFAC keeps all of its state
    (figures copy an optimizer with its model), and the copy's hooks follow the copied model."""
    net, X, y = problem("categorical")
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(net, loss_fn, **SHORT)
    for xb, yb in batches(X, y, 3):
        opt.zero_grad()
        loss_fn(net(xb), yb).backward()
        opt.step()
    twin = copy.deepcopy(opt)
    assert twin.model is not net and twin.k == opt.k == 4 and twin.lam == opt.lam
    assert [id(p) for p in twin.param_groups[0]["params"]] == [id(p) for p in twin.model.parameters()]
    twin.generator.set_state(opt.generator.get_state())
    for xb, yb in batches(X, y, 3, seed=4):
        for o in (opt, twin):
            o.zero_grad()
            o.torch_loss.module(o.model(xb), yb).backward()
            o.step()
    for p, q in zip(net.parameters(), twin.model.parameters()):
        assert torch.equal(p, q)


def test_a_failed_step_leaves_the_optimizer_as_it_was():
    """Bad targets (or a diverged loss) raise before anything changes, the random stream included."""
    net, X, y = problem("categorical")
    opt, ref = KFAC(copy.deepcopy(net), "categorical", seed=2), KFAC(copy.deepcopy(net), "categorical", seed=2)
    with pytest.raises(ValueError, match="categorical targets"):
        opt.step(X, y + 10)
    assert opt.k == 1 and opt.factors is None
    sa, sb = opt.step(X, y), ref.step(X, y)
    assert (sa["alpha"], sa["M"]) == (sb["alpha"], sb["M"])
