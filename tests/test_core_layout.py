"""The parameter layout of docs/math.md §1: W = [weight, bias], θ = [vec(W_1); …] column-major."""

from __future__ import annotations

import itertools

import oracle as O
import pytest
import torch
from torch import nn

from kfac_lens import NetworkView, mats_to_vec, vec_to_mats

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = [(3, 5), (4, 4), (2, 5), (1, 3)]


def random_mats(shapes, *batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*batch, r, c, generator=gen, dtype=torch.float64) for r, c in shapes]


def test_round_trip_mats_vec_mats():
    mats = random_mats(SHAPES)
    v = mats_to_vec(mats)
    assert v.shape == (sum(r * c for r, c in SHAPES),)
    back = vec_to_mats(v, SHAPES)
    assert len(back) == len(SHAPES)
    for M, B in zip(mats, back):
        assert B.shape == M.shape
        assert torch.equal(B, M)


def test_round_trip_vec_mats_vec_with_batch_dims():
    P = sum(r * c for r, c in SHAPES)
    v = torch.randn(2, 3, P, dtype=torch.float64)
    mats = vec_to_mats(v, SHAPES)
    assert [tuple(M.shape) for M in mats] == [(2, 3, r, c) for r, c in SHAPES]
    assert torch.equal(mats_to_vec(mats), v)
    # each batch entry is laid out on its own
    for b in range(2):
        for t in range(3):
            assert torch.equal(mats_to_vec([M[b, t] for M in mats]), v[b, t])


def test_entry_offsets_are_column_major():
    """W_k[r, c] sits at offset (start of block k) + c·d_out + r."""
    start = 0
    P = sum(r * c for r, c in SHAPES)
    for k, (rows, cols) in enumerate(SHAPES):
        for r in range(rows):
            for c in range(cols):
                mats = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
                mats[k][r, c] = 1.0
                v = mats_to_vec(mats)
                expect = torch.zeros(P, dtype=torch.float64)
                expect[start + c * rows + r] = 1.0
                assert torch.equal(v, expect), (k, r, c)
                back = vec_to_mats(expect, SHAPES)
                assert float(back[k][r, c]) == 1.0 and sum(float(B.abs().sum()) for B in back) == 1.0
        start += rows * cols


def test_mats_to_vec_matches_oracle_vec():
    mats = random_mats(SHAPES, seed=3)
    assert torch.equal(mats_to_vec(mats), torch.cat([O.vec(M) for M in mats]))


def test_vec_to_mats_rejects_wrong_length():
    with pytest.raises(ValueError, match="entries"):
        vec_to_mats(torch.zeros(7, dtype=torch.float64), SHAPES)


@pytest.mark.parametrize("kind", ["d2", "d3", "d4"])
@pytest.mark.parametrize("layers", [None, "subset"])
def test_view_weight_matrices_and_flatten(kind, layers):
    net = O.make_net(kind)
    view = NetworkView(net)
    n_lin = len(O.linears(net))
    sel = None if layers is None else [0, n_lin - 1]
    assert len(view) == n_lin
    Ws = view.weight_matrices(sel)
    lins = O.linears(net)
    for k, W in zip(O.all_layers(net, sel), Ws):
        assert torch.equal(W, O.W_of(lins[k]))
        assert tuple(W.shape) == view.layers[k].shape
    assert torch.equal(view.flatten(Ws), O.theta(net, sel))
    assert view.n_params(sel) == O.theta(net, sel).numel()
    assert view.shapes(sel) == O.shapes(net, sel)
    offs = O.offsets(O.sizes(net, sel))
    assert [(s.start, s.stop) for s in view.block_slices(sel)] == list(itertools.pairwise(offs))
    th = O.theta(net, sel)
    for M, B in zip(view.unflatten(th, sel), Ws):
        assert torch.equal(M, B)


def test_bias_free_layer_has_no_homogeneous_column():
    net = O.make_net("d4")
    view = NetworkView(net)
    assert [L.has_bias for L in view.layers] == [True, False, True, True]
    assert view.layers[1].shape == (4, 6)
    assert view.layers[0].shape == (6, 6)


@pytest.mark.parametrize("kind,layers", [("d3", None), ("d4", None), ("d4", [1, 2]), ("d4", [0, 3])])
def test_gradient_matrices_equal_autograd_in_oracle_layout(kind, layers):
    """The flat gradient read from .grad equals autograd's gradient with respect to the oracle's θ."""
    net = O.make_net(kind)
    X = O.make_inputs(net, 7)
    y = O.random_targets("gaussian", 7, O.n_outputs(net), torch.Generator().manual_seed(5))

    net.zero_grad()
    h = sum(O.loss("gaussian", z, t) for z, t in zip(net(X), y)) / 7
    h.backward()
    flat = mats_to_vec(NetworkView(net).gradient_matrices(layers))

    th = O.theta(net, layers).requires_grad_(True)
    h_o = sum(O.loss("gaussian", z, t) for z, t in zip(O.forward(net, X, th, layers), y)) / 7
    (g_o,) = torch.autograd.grad(h_o, th)
    assert h_o.detach().item() == pytest.approx(h.detach().item(), rel=1e-14)
    assert O.rel(flat, g_o) < 1e-13
    assert float(g_o.norm()) > 0


def test_add_and_set_weights_move_theta_in_layout():
    net = O.make_net("d4")
    view = NetworkView(net)
    th0 = O.theta(net)
    delta = random_mats(view.shapes(), seed=9)
    view.add_to_weights(delta, alpha=-0.5)
    assert O.rel(O.theta(net), th0 - 0.5 * mats_to_vec(delta)) < 1e-15
    view.set_weight_matrices(vec_to_mats(th0, view.shapes()))
    assert torch.equal(O.theta(net), th0)


def test_oracle_forward_matches_module():
    """Sanity of the oracle itself: its θ → z walk reproduces the torch module."""
    for kind in ("d2", "d3", "d4"):
        net = O.make_net(kind)
        X = O.make_inputs(net, 5)
        assert O.rel(O.forward(net, X, O.theta(net)), net(X)) < 1e-15
        assert isinstance(net, nn.Sequential)
