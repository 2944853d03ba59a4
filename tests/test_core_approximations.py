"""Approximations of the Fisher as operators, and the dense path of compare_approximations.

Every operator (F̃, F̆, F̂, EK-FAC, diag(F), exact F_kk), damped and inverted, is checked against the
independent dense oracle (tests/oracle.py) to about 1e-10; EK-FAC against George et al.'s theorem.
"""

from __future__ import annotations

import math

import oracle as O
import pytest
import torch

from kfac_lens import (
    APPROXIMATIONS,
    Approximation,
    DenseTooLargeError,
    approximation_operator,
    build_approximations,
    compare_approximation_blocks,
    compare_approximations,
    exact_fisher,
    kronecker_factors,
    loss_gradient,
    vec_to_mats,
)

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-10
FAMILIES = O.FAMILIES
# (kind, layers): consecutive layer sets (F̂ of the network needs them)
CASES = [("d2", None), ("d3", None), ("d4", None), ("d4", [1, 2]), ("d4", [1, 2, 3])]


def oracle_parts(net, X, family, sel):
    F = O.exact_fisher(net, X, family, sel)
    A, G = O.kronecker_factors(net, X, family, sel)
    return F, A, G, O.sizes(net, sel)


def oracle_approximation(name, F, A, G, sel, szs):
    """The undamped approximation ``name`` from the oracle's definitions."""
    Ft = O.kfac_dense(A, G, sel)
    return {
        "kfac": Ft,
        "kfac-blockdiag": O.exact_block_diagonal(Ft, szs),
        "kfac-tridiag": O.tridiag_approximation(A, G, sel),
        "ekfac": O.ekfac_dense(F, A, G, sel, szs),
        "diagonal": O.fisher_diagonal(F),
        "blockdiag-exact": O.exact_block_diagonal(F, szs),
        # KFAC-reduce factors with U = 1 use per case (every layer of these chains) are the factors themselves
        "kfac-reduce": O.exact_block_diagonal(Ft, szs),
    }[name]


def check_operator(op, D, shapes, tol=TOL):
    """``@`` on a vector and on P×m columns, and apply on per-layer matrices, all equal the dense matrix."""
    gen = torch.Generator().manual_seed(3)
    V = torch.randn(D.shape[0], 3, generator=gen, dtype=torch.float64)
    assert O.rel(op @ V[:, 0], D @ V[:, 0]) < tol
    assert O.rel(op @ V, D @ V) < tol
    out = op.apply(vec_to_mats(V[:, 1], shapes))
    assert O.rel(torch.cat([O.vec(M) for M in out]), D @ V[:, 1]) < tol


def oracle_damped(F, A, G, Ad, Gd, sel, szs, gamma):
    """The damped approximations from the oracle: factored Tikhonov (Ad, Gd) for the Kronecker ones,
    + γ²I for the others."""
    eye = torch.eye(F.shape[0], dtype=F.dtype)
    Ft = O.kfac_dense(Ad, Gd, sel)
    return {"kfac": Ft, "kfac-blockdiag": O.exact_block_diagonal(Ft, szs),
            "kfac-tridiag": torch.linalg.inv(O.tridiag_inverse(Ad, Gd, sel)),
            "ekfac": O.ekfac_dense(F, A, G, sel, szs) + gamma ** 2 * eye,
            "diagonal": O.fisher_diagonal(F) + gamma ** 2 * eye,
            "blockdiag-exact": O.exact_block_diagonal(F, szs) + gamma ** 2 * eye,
            "kfac-reduce": O.exact_block_diagonal(Ft, szs)}  # U = 1 use per case: F̆ (factored Tikhonov)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind,layers", CASES)
def test_operators_match_oracle(kind, layers, family):
    net, X, _ = O.problem(kind, family)
    sel = O.all_layers(net, layers)
    F, A, G, szs = oracle_parts(net, X, family, sel)
    ops = build_approximations(net, X, family, layers=layers)
    assert list(ops) == list(Approximation) and [str(a) for a in ops] == list(APPROXIMATIONS)
    for name, op in ops.items():
        ref = oracle_approximation(str(name), F, A, G, sel, szs)
        D = op.dense()
        assert O.rel(D, ref) < TOL, name
        assert op.kind == name and op.layers == sel
        check_operator(op, D, O.shapes(net, sel))


def test_operators_cast_to_float32_apply_the_oracle_matrices():
    """astype(float32): the products of every approximation (damped too) in float32, within its rounding of the
    oracle's matrix; the float64 operator is unchanged, and the exact blocks (read from float64 captures) stay
    float64."""
    net, X, _ = O.problem("d4", "bernoulli")
    sel = O.all_layers(net, None)
    F, A, G, szs = oracle_parts(net, X, "bernoulli", sel)
    V = torch.randn(sum(szs), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for name, op in build_approximations(net, X, "bernoulli").items():
        ref = oracle_approximation(str(name), F, A, G, sel, szs)
        low = op.astype(torch.float32)
        assert op.astype(torch.float64) is op and op.dtype == torch.float64
        if name == Approximation.BLOCKDIAG_EXACT:
            assert low is op
            continue
        assert low.dtype == torch.float32 and low.kind == name
        out = low @ V.float()
        assert out.dtype == torch.float32 and O.rel(out.double(), ref @ V) < 1e-5, name
        assert O.rel(op @ V, ref @ V) < TOL, name  # (the original keeps its float64 tensors)
        damped = op.damped(0.3).astype(torch.float32)
        assert O.rel((damped @ V.float()).double(), op.damped(0.3) @ V) < 1e-5, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind,layers", [("d3", None), ("d4", None)])
def test_damped_operators_and_inverses_match_oracle(kind, layers, family):
    """Factored Tikhonov for the Kronecker ones (as the inverse operators), + γ²I for the others; the damped
    F̂ is the inverse of the oracle's F̂⁻¹; inverse() is the inverse of the damped dense matrix."""
    gamma = 0.1
    net, X, _ = O.problem(kind, family)
    sel = O.all_layers(net, layers)
    F, A, G, szs = oracle_parts(net, X, family, sel)
    Ad, Gd, _ = O.damp(A, G, sel, gamma)
    refs = oracle_damped(F, A, G, Ad, Gd, sel, szs, gamma)
    for name, op in build_approximations(net, X, family, layers=layers).items():
        damped = op.damped(gamma)
        assert O.rel(damped.dense(), refs[str(name)]) < 1e-9, name
        assert O.rel(approximation_operator(name, net, X, family, gamma).dense(), refs[str(name)]) < 1e-9
        inv = damped.inverse()
        if name == Approximation.KFAC:
            assert inv is None  # no cheap inverse: CG on its products (compare_approximations)
            continue
        assert O.rel(inv.dense(), torch.linalg.inv(refs[str(name)])) < 1e-9, name
        check_operator(inv, inv.dense(), O.shapes(net, sel))
    # the tridiagonal chain on damped factors is the same F̂
    assert O.rel(O.tridiag_approximation(Ad, Gd, sel), refs["kfac-tridiag"]) < 1e-9


@pytest.mark.parametrize("family", ["categorical", "bernoulli"])
def test_ekfac_scaling_is_the_expectation_over_targets(family):
    """EK-FAC's scaling equals Σ over every target y (weighted by its probability) of the squared projected
    gradient — the exact expectation, not a sample."""
    net, X, _ = O.problem("d3", family)
    A, G = O.kronecker_factors(net, X, family)
    op = build_approximations(net, X, family, ["ekfac"])[Approximation.EKFAC]
    for i, k in enumerate(op.layers):
        s = O.ekfac_scaling_by_enumeration(net, X, family, k, A, G)
        assert O.rel(O.vec(op.undamped[i]), s) < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_ekfac_never_worse_than_kfac_blockdiag(family):
    """George et al. (2018): in the Kronecker eigenbasis Q of a diagonal block, diag(Qᵀ F_kk Q) is the best
    diagonal scaling in Frobenius norm, and K-FAC's is another one, so ‖F_kk − EKFAC_kk‖_F ≤ ‖F_kk − F̃_kk‖_F
    for every block (the theorem is about the block-diagonal restriction of F) and hence overall, F's
    off-diagonal blocks being missed by both. Several random networks."""
    strict = 0
    for seed in range(4):
        for kind in ("d2", "d3", "d4"):
            net = O.make_net(kind, seed=seed, scale=1.0 + 0.5 * seed)
            X = O.make_inputs(net, 12, seed=seed + 5)
            ops = build_approximations(net, X, family, ["ekfac", "kfac-blockdiag"])
            F = exact_fisher(net, X, family)
            E, K = ops[Approximation.EKFAC].dense(), ops[Approximation.KFAC_BLOCKDIAG].dense()
            szs = O.sizes(net)
            for i in range(len(szs)):
                Fkk = O.block(F, szs, i, i)
                e = float((Fkk - O.block(E, szs, i, i)).norm())
                k = float((Fkk - O.block(K, szs, i, i)).norm())
                assert e <= k + 1e-12 * float(Fkk.norm()), (kind, seed, i, e, k)  # rounding slack
                strict += e < k * (1 - 1e-6)
            assert float((F - E).norm()) <= float((F - K).norm()) + 1e-12 * float(F.norm())
    assert strict > 0  # the inequality is not an accident of equal matrices


def test_tridiagonal_at_zero_damping_uses_the_pseudo_inverse():
    """Undamped F̂ of a softmax output (singular last G) is the γ → 0 limit of the damped one."""
    net, X, _ = O.problem("d3", "categorical")
    f = kronecker_factors(net, X, "categorical")
    op = build_approximations(net, X, "categorical", ["kfac-tridiag"], factors=f)[Approximation.KFAC_TRIDIAG]
    assert float(torch.linalg.eigvalsh(f.G[2, 2])[0]) < 1e-14  # 1 is in the null space of the last G
    assert O.rel(op.damped(1e-7).dense(), op.dense()) < 1e-5


# ----------------------------------------------------------------------------- compare_approximations (dense)
@pytest.mark.parametrize("kind,family", [("d2", "gaussian"), ("d3", "categorical"), ("d4", "bernoulli")])
def test_compare_dense_matches_oracle(kind, family):
    gamma, top_k = 0.1, 4
    net, X, y = O.problem(kind, family)
    df = compare_approximations(net, X, family, y=y, gamma=gamma, top_k=top_k).set_index("approximation")
    assert list(df.index) == list(APPROXIMATIONS)
    assert list(df.columns) == ["method", "gamma", "rel_frobenius", "ci_low", "ci_high", "ng_cosine", "top_eigs_F",
                                "top_eigs_precond", "precond_cond"]
    sel = O.all_layers(net)
    F, A, G, szs = oracle_parts(net, X, family, sel)
    Ad, Gd, _ = O.damp(A, G, sel, gamma)
    eye = torch.eye(F.shape[0], dtype=F.dtype)
    Fg = F + gamma ** 2 * eye
    g = O.loss_gradient(net, X, y, family)
    assert O.rel(loss_gradient(net, X, y, family), g) < 1e-12
    exact_dir = torch.linalg.solve(Fg, g)
    eig_F = torch.linalg.eigvalsh(F).flip(0)[:top_k]
    damped = oracle_damped(F, A, G, Ad, Gd, sel, szs, gamma)
    for name, row in df.iterrows():
        ref = oracle_approximation(name, F, A, G, sel, szs)
        rel = float((F - ref).norm() / F.norm())
        assert row.rel_frobenius == pytest.approx(rel, rel=TOL) and row.ci_low == row.ci_high == row.rel_frobenius
        u = torch.linalg.solve(damped[name], g)
        assert row.ng_cosine == pytest.approx(float(u @ exact_dir / (u.norm() * exact_dir.norm())), abs=1e-10)
        assert O.rel(torch.tensor(row.top_eigs_F, dtype=torch.float64), eig_F) < TOL
        ev = O.generalized_eigvals(Fg, damped[name])
        assert O.rel(torch.tensor(row.top_eigs_precond, dtype=torch.float64), ev[:top_k]) < 1e-9, name
        assert row.precond_cond == pytest.approx(float(ev[0] / ev[-1]), rel=1e-8)
    assert df.loc["kfac-tridiag", "rel_frobenius"] < df.loc["kfac-blockdiag", "rel_frobenius"]


def test_compare_without_targets_or_damping_leaves_those_columns_empty():
    net, X, y = O.problem("d2", "gaussian")
    df = compare_approximations(net, X, "gaussian", ["ekfac", "diagonal"], gamma=0.1)
    assert df.ng_cosine.isna().all() and df.top_eigs_precond.notna().all()
    df = compare_approximations(net, X, "gaussian", "ekfac", y=y)
    assert df.ng_cosine.isna().all() and df.precond_cond.isna().all() and df.top_eigs_precond.isna().all()
    assert list(df.approximation) == ["ekfac"] and len(df.top_eigs_F[0]) == 10


def test_compare_blocks_dense_matches_oracle():
    net, X, _ = O.problem("d3", "bernoulli")
    df = compare_approximation_blocks(net, X, "bernoulli", ["kfac-tridiag", "blockdiag-exact"])
    sel = O.all_layers(net)
    F, A, G, szs = oracle_parts(net, X, "bernoulli", sel)
    assert len(df) == 2 * 9
    for _, row in df.iterrows():
        ref = oracle_approximation(row.approximation, F, A, G, sel, szs)
        i, j = row.block_row, row.block_col
        expect = float((O.block(F, szs, i, j) - O.block(ref, szs, i, j)).norm() / O.block(F, szs, i, j).norm())
        assert row.rel_frobenius == pytest.approx(expect, rel=TOL, abs=1e-14)
        assert row.kind == ("diagonal" if i == j else "tridiagonal" if abs(i - j) == 1 else "off-tridiagonal")
    exact = df[df.approximation == "blockdiag-exact"]
    assert (exact[exact.kind == "diagonal"].rel_frobenius < 1e-12).all()
    assert (exact[exact.kind != "diagonal"].rel_frobenius == 1.0).all()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    ({"approximations": ["kfac", "shampoo"]}, r"approximations: unknown approximation 'shampoo'; choose from"),
    ({"approximations": []}, r"approximations is empty"),
    ({"method": "sketch"}, r"method must be one of \('dense', 'matrix-free'\)"),
    ({"probes": 0}, r"probes must be a positive integer"),
    ({"probes": -3}, r"probes must be a positive integer"),
    ({"gamma": -1e-3}, r"gamma must be None .* or a finite number ≥ 0, got -0.001; pass e.g. gamma=1e-3"),
    ({"gamma": math.nan}, r"gamma must be None"),
    ({"top_k": 0}, r"top_k must be a positive integer"),
    ({"confidence": 1.5}, r"confidence must be a probability"),
    ({"spectra": ["ekfac"], "approximations": ["kfac"]}, r"spectra names \['ekfac'\], which are not among"),
    ({"spectra": ["kfac"], "method": "matrix-free", "gamma": 0.1}, r"spectra: 'kfac' has no cheap inverse"),
])
def test_bad_arguments_are_named(kwargs, match):
    net, X, _ = O.problem("d2", "gaussian", n=4)
    with pytest.raises(ValueError, match=match):
        compare_approximations(net, X, "gaussian", **kwargs)


def test_bad_arguments_of_the_block_table_and_operators():
    net, X, _ = O.problem("d2", "gaussian", n=4)
    with pytest.raises(ValueError, match="method must be one of"):
        compare_approximation_blocks(net, X, "gaussian", method="exact")
    with pytest.raises(ValueError, match="probes must be a positive integer"):
        compare_approximation_blocks(net, X, "gaussian", method="matrix-free", probes=0)
    with pytest.raises(ValueError, match="name: unknown approximation 'kfac-diag'"):
        approximation_operator("kfac-diag", net, X, "gaussian")
    with pytest.raises(ValueError, match="gamma must be a finite number ≥ 0"):
        approximation_operator("ekfac", net, X, "gaussian", gamma=-1.0)
    with pytest.raises(DenseTooLargeError, match="Drop it from approximations"):
        build_approximations(net, X, "gaussian", ["blockdiag-exact"], max_capture_bytes=100)
    # undamped diag(F) with a dead direction cannot be inverted: the message says how to damp it
    op = approximation_operator("diagonal", net, X, "gaussian")
    op.D[0][0, 0] = 0.0
    with pytest.raises(ValueError, match="pass gamma > 0"):
        op.inverse()


# ----------------------------------------------------------------------------- output-Fisher path (Linear chains)
def _capture_statistics(net, X, family, sel, pairs):
    """Today's capture path (R backward directions per case), forced by hiding the chain's structure:
    ``NetworkView(net, example_input=...)`` reads the same network through a probe pass."""
    from kfac_lens.nets import NetworkView

    view = NetworkView(net, example_input=X[:2])
    f = kronecker_factors(view, X, family, layers=sel, pairs=pairs)
    ops = build_approximations(view, X, family, ["ekfac", "diagonal"], layers=sel, factors=f)
    return f, ops[Approximation.EKFAC], ops[Approximation.DIAGONAL]


def _chain_nets():
    torch.manual_seed(4)
    return [O.make_net("d4"), O.make_net("d3"),
            torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(5, 6), torch.nn.ReLU(inplace=True),
                                torch.nn.Linear(6, 6), torch.nn.Linear(6, 3, bias=False), torch.nn.Sigmoid()).double()]


@pytest.mark.parametrize("family", FAMILIES)
def test_output_fisher_statistics_match_the_capture_path(family):
    """Propagating M_k = E_y[g_k g_kᵀ] backwards (curvature/output_fisher.py) gives today's capture-path factors
    (every pair), diag(F) and EK-FAC scaling to rounding, for subsets of layers and small chunks."""
    from kfac_lens.capture import analysis_view
    from kfac_lens.curvature.output_fisher import chain_statistics, supports_output_fisher
    from kfac_lens.likelihoods import get_likelihood

    for net in _chain_nets():
        view = analysis_view(net, torch.float64)
        assert supports_output_fisher(view)
        X = O.make_inputs(net, 11, seed=2)
        L = len(view.layers)
        for sel in (list(range(L)), [1, L - 1], [0, 1]):
            f, ekfac, diag = _capture_statistics(net, X, family, sel, "all")
            eig = {k: (QA, QG) for k, QA, QG in zip(sel, ekfac.QA, ekfac.QG)}
            st = chain_statistics(view, X, get_likelihood(family), sel, pairs="all", diagonal=True, eigenbases=eig,
                                  chunk_size=4)
            assert sorted(st.factors.A.keys()) == sorted(f.A.keys()) and st.factors.n_cases == 11
            for kl in f.A.keys():
                assert O.rel(st.factors.A[kl], f.A[kl]) < TOL and O.rel(st.factors.G[kl], f.G[kl]) < TOL, kl
            for i in range(len(sel)):
                assert O.rel(st.diagonal[i], diag.undamped[i]) < TOL and O.rel(st.ekfac[i], ekfac.undamped[i]) < TOL


def force_path(monkeypatch, path: str) -> list:
    """Make build_approximations and exact_factors take ``path`` on chains; returns the list that records each
    call of chain_statistics (the output-Fisher pass)."""
    import kfac_lens.curvature.approximations as approximations_module
    import kfac_lens.curvature.output_fisher as output_fisher_module

    calls = []
    real = output_fisher_module.chain_statistics

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    def forced(view, layers, ekfac=False):
        return path == "output-fisher" and output_fisher_module.supports_output_fisher(view)

    for module in (approximations_module, output_fisher_module):
        monkeypatch.setattr(module, "output_fisher_is_cheaper", forced)
        monkeypatch.setattr(module, "chain_statistics", spy)
    return calls


@pytest.mark.parametrize("path", ["output-fisher", "capture"])
@pytest.mark.parametrize("family", ["bernoulli", "categorical"])
def test_output_fisher_path_matches_oracle_and_capture_path_for_compare(family, path, monkeypatch):
    """compare_approximations on a chain, through the output-Fisher pass or the capture pass (whichever
    output_fisher_is_cheaper would pick, both are forced here), equals the oracle's values and those of the
    same network read through a probe pass (always the captures)."""
    from kfac_lens.nets import NetworkView

    calls = force_path(monkeypatch, path)
    net, X, _ = O.problem("d4", family)
    sel = O.all_layers(net)
    F, A, G, szs = oracle_parts(net, X, family, sel)
    names = ["kfac", "kfac-tridiag", "ekfac", "diagonal"]
    chain = compare_approximations(net, X, family, names, top_k=3).set_index("approximation")
    probed = compare_approximations(NetworkView(net, example_input=X[:2]), X, family, names,
                                    top_k=3).set_index("approximation")
    for name in names:
        ref = oracle_approximation(name, F, A, G, sel, szs)
        rel = float((F - ref).norm() / F.norm())
        assert chain.loc[name, "rel_frobenius"] == pytest.approx(rel, rel=TOL)
        assert chain.loc[name, "rel_frobenius"] == pytest.approx(probed.loc[name, "rel_frobenius"], rel=TOL)
    assert bool(calls) == (path == "output-fisher")


def test_output_fisher_pass_is_chosen_where_it_is_cheaper():
    """The cost model: an autoencoder (R = 784 directions) propagates the output Fisher; a wide classifier
    (R = 10) keeps the captures, whose R·P multiply-adds are ~50x fewer than Σ d²a there. Also timed: on
    784-1000-1000-10 at N = 500, build_approximations took 177 s through the output Fisher, 2 s now."""
    from kfac_lens.capture import analysis_view
    from kfac_lens.curvature.output_fisher import output_fisher_is_cheaper

    def chain(sizes):
        mods = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            mods += [torch.nn.Linear(a, b), torch.nn.Tanh()]
        return analysis_view(torch.nn.Sequential(*mods[:-1]), torch.float64)

    autoencoder = chain([784, 250, 100, 30, 100, 250, 784])
    classifier = chain([784, 1000, 1000, 10])
    assert output_fisher_is_cheaper(autoencoder, list(range(6)))
    assert output_fisher_is_cheaper(autoencoder, list(range(6)), ekfac=True)
    assert not output_fisher_is_cheaper(classifier, [0, 1, 2])
    assert not output_fisher_is_cheaper(classifier, [0, 1, 2], ekfac=True)


def test_output_fisher_path_is_only_taken_where_exact():
    """Other modules (Softplus, LayerNorm, convolutions, probe-read models) keep the capture path, and
    chain_statistics refuses them by name."""
    from kfac_lens.capture import analysis_view
    from kfac_lens.curvature.output_fisher import chain_statistics, supports_output_fisher
    from kfac_lens.likelihoods import get_likelihood
    from kfac_lens.nets import NetworkView

    soft = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Softplus(), torch.nn.Linear(5, 3)).double()
    X = O.make_inputs(soft, 9)
    view = analysis_view(soft, torch.float64)
    assert not supports_output_fisher(view)
    assert not supports_output_fisher(NetworkView(O.make_net("d2"), example_input=X[:2, :4]))
    with pytest.raises(ValueError, match="use the capture path"):
        chain_statistics(view, X, get_likelihood("gaussian"), [0, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        chain_statistics(analysis_view(O.make_net("d2"), torch.float64), X[:, :4], get_likelihood("gaussian"),
                         [1, 0])
    # the fallback still matches the oracle
    F, A, G, szs = oracle_parts(soft, X, "gaussian", [0, 1])
    ops = build_approximations(soft, X, "gaussian", ["kfac-tridiag", "ekfac", "diagonal"])
    for name, op in ops.items():
        assert O.rel(op.dense(), oracle_approximation(str(name), F, A, G, [0, 1], szs)) < TOL, name
