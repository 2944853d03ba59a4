"""The approximations-over-training figure: its numbers at each stored iteration against the oracle."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import oracle as O
import pytest
import torch

from kfac_lens.figures import approximation_history, figure_approximations

pytestmark = pytest.mark.usefixtures("single_thread")


@dataclass
class StoredRun:
    """What approximation_history reads from a zoo entry: weights at some iterations, the γ K-FAC held."""

    name: str
    iteration: int
    gamma: float
    states: dict = field(default_factory=dict)

    @property
    def snapshot_iterations(self):
        return sorted(i for i in self.states if i != self.iteration)

    def at_iteration(self, iteration):
        net = O.make_net("d3")
        net.load_state_dict(self.states[iteration])
        return net


@pytest.fixture(scope="module")
def run():
    net = O.make_net("d3", seed=0)
    states = {1: copy.deepcopy(net.state_dict())}
    with torch.no_grad():  # a different point of "training": the weights moved
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    states[7] = copy.deepcopy(net.state_dict())
    return StoredRun("d3-run", 7, 0.3, states)


def test_history_matches_the_oracle_at_every_iteration(run):
    net = run.at_iteration(1)
    X = O.make_inputs(net, O.N_CASES)
    y = torch.randint(0, O.n_outputs(net), (O.N_CASES,), generator=torch.Generator().manual_seed(0))
    hist = approximation_history(run, X, y, "categorical", approximations=["kfac", "diagonal", "blockdiag-exact"])
    assert sorted(hist["iteration"].unique()) == [1, 7]
    assert hist.attrs["gamma"] == 0.3  # the γ K-FAC held, by default
    for it in (1, 7):
        model = run.at_iteration(it)
        F = O.exact_fisher(model, X, "categorical")
        A, G = O.kronecker_factors(model, X, "categorical")
        layers = O.all_layers(model)
        szs = O.sizes(model)
        blockdiag = torch.block_diag(*[O.block(F, szs, i, i) for i in range(len(szs))])
        want = {"kfac": O.rel(O.kfac_dense(A, G, layers), F), "diagonal": O.rel(torch.diag(torch.diag(F)), F),
                "blockdiag-exact": O.rel(blockdiag, F)}
        got = hist[hist["iteration"] == it].set_index("approximation")["rel_frobenius"]
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (it, name)
    # the two iterations differ: the figure is not drawing one network twice
    assert not hist[hist.iteration == 1]["rel_frobenius"].equals(hist[hist.iteration == 7]["rel_frobenius"])


def test_figure_draws_one_line_per_approximation(run, agg_backend):
    net = run.at_iteration(1)
    X = O.make_inputs(net, O.N_CASES)
    y = torch.zeros(O.N_CASES, dtype=torch.long)
    drawn = figure_approximations(approximation_history(run, X, y, "categorical"))
    ax_err, ax_cos = drawn.figure.axes[:2]
    assert len(ax_err.get_lines()) == 6 and len(ax_cos.get_lines()) == 6
    assert ax_err.get_yscale() == "log"
    assert set(drawn.metrics["approximation"]) == {"kfac", "kfac-blockdiag", "kfac-tridiag", "ekfac", "diagonal",
                                                   "blockdiag-exact"}


def test_unknown_iteration_is_refused_by_name(run):
    X = O.make_inputs(run.at_iteration(1), 4)
    with pytest.raises(ValueError, match=r"iterations \[3\] are not stored for d3-run"):
        approximation_history(run, X, None, "categorical", iterations=[3])
