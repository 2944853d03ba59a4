"""The string options as enums (kfac_lens.options): members and strings are interchangeable everywhere."""

import io

import pytest
import torch
from torch import nn

import kfac_lens as kl
from kfac_lens.options import Estimator, FactorApprox, InverseKind, parse


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_parse_accepts_members_and_strings_in_any_case():
    assert parse(Estimator, "MC", "estimator") is Estimator.MC
    assert parse(InverseKind, InverseKind.TRIDIAG, "inverse") is InverseKind.TRIDIAG
    assert parse(FactorApprox, "reduce", "approx") is FactorApprox.REDUCE
    assert Estimator.MC == "mc" and f"{InverseKind.BLOCKDIAG}" == "blockdiag" and str(FactorApprox.EXPAND) == "expand"


@pytest.mark.parametrize("value", ["full", 3, None, Estimator.MC])
def test_parse_names_the_argument_and_the_choices(value):
    with pytest.raises(ValueError, match=r"inverse must be one of 'blockdiag', 'tridiag'"):
        parse(InverseKind, value, "inverse")


def test_functions_take_the_enums():
    net = small_net()
    X = torch.randn(20, 4, dtype=torch.float64)
    F_str = kl.fisher(net, X, "categorical", estimator="exact")
    F_enum = kl.fisher(net, X, "categorical", estimator=Estimator.EXACT)
    assert torch.equal(F_str, F_enum)
    fa = kl.kronecker_factors(net, X, "categorical", estimator=Estimator.EXACT, approx=FactorApprox.EXPAND)
    assert fa.estimator == "exact" and type(fa.estimator) is str  # stored as a plain string
    with pytest.raises(ValueError, match="unknown estimator"):
        kl.fisher(net, X, "categorical", estimator="exakt")


def test_kfac_takes_the_enums_and_saves_plain_strings():
    net = small_net()
    X = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    opt = kl.KFAC(net, "categorical", InverseKind.TRIDIAG, curvature_estimator=Estimator.EXACT, seed=0)
    assert opt.inverse_kind == "tridiag" and type(opt.inverse_kind) is str
    opt.step(X, y)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # no enum classes inside: the safe loader reads it
    assert sd["inverse_kind"] == "tridiag"
