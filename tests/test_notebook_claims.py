"""What the story notebooks say in prose is true of the numbers they compute.

Each notebook collects the numbers its sentences state or compare in a dict ``key_numbers`` and
displays it, as JSON, in its last code cell (tagged ``key-numbers``). These tests read that output
from the executed notebook — the same execution tests/test_notebooks.py checks, shared through
:mod:`notebook_run`, so each notebook runs once per session — and assert the direction of every
comparative claim in the prose, with the thresholds the prose uses ("more than 90%", "at least twice
as low", ...). When a cached zoo network is retrained and a claim stops holding, the test names the
claim and the measured value, and the prose has to change with the numbers.
"""

from __future__ import annotations

import math

import pytest
from notebook_run import RUN_TIMEOUT, executed, key_numbers

pytestmark = [pytest.mark.notebook, pytest.mark.timeout(RUN_TIMEOUT)]


def _numbers(name: str, tmp_path_factory) -> dict:
    return key_numbers(executed(name, tmp_path_factory))


@pytest.fixture(scope="module")
def nb01(tmp_path_factory):
    return _numbers("01_exact_fisher_vs_kfac.ipynb", tmp_path_factory)


@pytest.fixture(scope="module")
def nb02(tmp_path_factory):
    return _numbers("02_block_diagonal_vs_tridiagonal.ipynb", tmp_path_factory)


@pytest.fixture(scope="module")
def nb03(tmp_path_factory):
    return _numbers("03_damping_and_rescaling.ipynb", tmp_path_factory)


@pytest.fixture(scope="module")
def nb04(tmp_path_factory):
    return _numbers("04_training.ipynb", tmp_path_factory)


# ---------------------------------------------------------------- 01: the exact Fisher against F̃
def test_01_says_how_many_cases_it_uses(nb01):
    """'the first 5 000 ... all 50 000 training cases' (the CLI)."""
    assert (nb01["n_cases"], nb01["cli_cases"]) == (5000, 50000)


def test_01_example_network_is_at_about_five_percent_error(nb01):
    assert 0.04 <= nb01["training_error"] <= 0.06, nb01["training_error"]


def test_01_every_block_of_F_tilde_is_a_little_smaller_than_F(nb01):
    """'its Frobenius norm is a little smaller, between 80% and 100% of F's block's'."""
    lo, hi = nb01["block_norm_ratio_min"], nb01["block_norm_ratio_max"]
    assert 0.8 < lo <= hi < 1.0, (lo, hi)


def test_01_F_tilde_has_the_sign_of_F_on_most_entries_and_most_mass(nb01):
    """'the sign of F on most of the entries, and those entries carry more than 90% of F's mass'."""
    assert nb01["sign_agreement_entries"] > 0.5, nb01["sign_agreement_entries"]
    assert nb01["sign_agreement_mass"] > 0.9, nb01["sign_agreement_mass"]


def test_01_every_block_error_is_more_than_a_third(nb01):
    """'every block is off by more than a third of its own norm'."""
    assert nb01["block_rel_error_min"] > 1 / 3, nb01["block_rel_error_min"]


def test_01_one_case_is_exact_and_two_are_not(nb01):
    assert nb01["one_case_fisher_vs_kfac"] < 1e-12
    assert nb01["one_case_gn_vs_kfac"] < 1e-12
    assert nb01["two_cases_rel_diff"] > 1e-3


def test_01_appendix_B_terms_are_of_the_order_of_the_difference(nb01):
    """'each between a tenth of its norm and ten times it'; the exact-Fisher residual is rounding."""
    assert 0.1 <= nb01["cumulant_terms_min"] <= nb01["cumulant_terms_max"] <= 10
    assert nb01["exact_residual"] < 1e-8


def test_01_empirical_fisher_residual_is_small_but_far_above_rounding(nb01):
    """'under 5% of ‖F − F̃‖ — but ... far above the true Fisher's'."""
    emp = nb01["empirical_residual"]
    assert 1e-8 < emp < 0.05, emp
    assert emp > 1e6 * max(nb01["exact_residual"], 1e-16)


# ---------------------------------------------------------------- 02: block-diagonal vs tridiagonal
def test_02_says_how_many_cases_it_uses(nb02):
    assert (nb02["n_cases"], nb02["cli_cases"]) == (5000, 50000)


def test_02_F_hat_reproduces_the_tridiagonal_blocks(nb02):
    assert nb02["F_hat_tridiagonal_max_error"] < 1e-8


def test_02_F_hat_off_tridiagonal_errors_are_small_but_not_zero(nb02):
    """'each off-tridiagonal block ... off by less than 10% (but not by 0), and all of F̂ by less than
    5%, against more than 50% for F̆'."""
    assert 0 < nb02["F_hat_off_tridiagonal_min_error"]
    assert nb02["F_hat_off_tridiagonal_max_error"] < 0.10
    assert nb02["F_hat_overall_error"] < 0.05 < 0.5 < nb02["F_breve_overall_error"]


@pytest.mark.parametrize("kind", ["overall", "diagonal"])
def test_02_F_hat_inverse_beats_F_breve_inverse(nb02, kind):
    """Appendix C: F̂⁻¹ is the better approximation of F̃⁻¹, overall and even on the diagonal blocks."""
    hat, breve = nb02[f"inverse_{kind}_error_F_hat"], nb02[f"inverse_{kind}_error_F_breve"]
    assert hat < breve, (hat, breve)


def test_02_F_tilde_off_diagonal_blocks_carry_about_half_its_mass(nb02):
    """'about half of its squared Frobenius mass (between 40% and 60%)'."""
    assert 0.4 <= nb02["F_tilde_off_diagonal_mass"] <= 0.6, nb02["F_tilde_off_diagonal_mass"]


def test_02_white_levels(nb02):
    """The two white levels are within a factor of ten; F̃⁻¹'s diagonal blocks exceed its level ten times."""
    a, b = nb02["white_level_F_tilde"], nb02["white_level_inverse"]
    assert 0.1 < a / b < 10, (a, b)
    assert nb02["inverse_diagonal_block_max"] > 10 * b


def test_02_inverse_at_kfac_gamma_is_nearly_block_diagonal(nb02):
    """'more than 99% of its squared mass sits in the diagonal blocks'; the neighbour share of the rest
    is above the chance level (50% for four equal blocks) but below F̃'s own."""
    assert nb02["inverse_diagonal_mass"] > 0.99
    assert nb02["neighbour_share_chance"] == pytest.approx(0.5)
    assert nb02["neighbour_share_chance"] < nb02["inverse_neighbour_share"] < nb02["F_tilde_neighbour_share"]


def test_02_smaller_gamma_shows_the_tridiagonal_structure(nb02):
    """The smaller γ: less diagonal mass, more neighbour share (> 3/4 at γ = 1e-3), larger
    block-diagonal / block-tridiagonal truncation-error ratio."""
    rows = sorted(nb02["small_gamma"].items(), key=lambda kv: -float(kv[0]))  # γ decreasing
    assert len(rows) == 3 and float(rows[-1][0]) == pytest.approx(1e-3)
    for column, sign in (("diagonal_mass", -1), ("neighbour_share_of_off_diagonal", 1),
                         ("blockdiag / tridiag error", 1)):
        values = [r[column] for _, r in rows]
        assert all(sign * (b - a) > 0 for a, b in zip(values, values[1:])), (column, values)
    assert rows[-1][1]["neighbour_share_of_off_diagonal"] > 0.75


def test_02_differences_fade_as_gamma_grows(nb02):
    """The gap between F̆⁻¹'s and F̂⁻¹'s errors, and F̃⁻¹'s distance from c·I, shrink as γ grows."""
    rows = sorted(nb02["damping_fade"].items(), key=lambda kv: float(kv[0]))  # γ increasing
    assert len(rows) == 5 and float(rows[0][0]) == pytest.approx(1e-3)
    for column in ("gap", "distance of F̃⁻¹ from c·I"):
        values = [r[column] for _, r in rows]
        assert all(b < a for a, b in zip(values, values[1:])), (column, values)


# ---------------------------------------------------------------- 03: damping, re-scaling, momentum
RAW, MOM, NOMOM = "raw Δ (no re-scaling)", "re-scaled, momentum", "re-scaled, no momentum"


def _curves(nb03) -> list[tuple[float, dict]]:
    return sorted(((float(g), v) for g, v in nb03["curves"].items()), key=lambda gv: gv[0])


def test_03_says_how_many_cases_it_uses(nb03):
    assert (nb03["n_cases"], nb03["cli_cases"]) == (2000, 10000)


def test_03_figure7_is_computed_in_float64(nb03):
    assert nb03["dtype"] == "float64"


def test_03_raw_delta_losses_dwarf_the_rescaled_gains(nb03):
    """'worse by amounts more than a thousand times larger than anything the re-scaled updates gain'."""
    best = max(nb03["peak_momentum"], nb03["peak_no_momentum"])
    assert -nb03["raw_worst"] > 1000 * best, (nb03["raw_worst"], best)


def test_03_raw_delta_improves_h_only_far_above_kfac_gamma(nb03):
    """Worse at every γ up to 10× K-FAC's γ, worst at the smallest γ (over 100× worse than at K-FAC's γ);
    better only at more than 10×, including the top of the grid."""
    chosen, curves = nb03["kfac_gamma"], _curves(nb03)
    for g, v in curves:
        if g <= 10 * chosen * (1 + 1e-9):
            assert v[RAW] < 0, f"the raw Δ improves h at γ = {g:.3g} ({g / chosen:.3g}× K-FAC's γ)"
    assert all(g > 10 * chosen * (1 + 1e-9) for g in nb03["raw_improving_gammas"])
    assert curves[-1][1][RAW] > 0
    assert min(curves, key=lambda gv: gv[1][RAW])[0] == curves[0][0]  # worst at the smallest γ
    assert nb03["raw_at_kfac_gamma"] < 0
    assert nb03["raw_at_smallest_gamma"] < 100 * nb03["raw_at_kfac_gamma"]  # 'more than a hundred times as much'


def test_03_rescaled_updates_improve_h_at_every_gamma(nb03):
    for g, v in _curves(nb03):
        assert v[MOM] > 0 and v[NOMOM] > 0, (g, v)


def test_03_gamma_still_matters_after_rescaling(nb03):
    """The re-scaled improvement peaks below K-FAC's γ; at the smallest γ it is under 1% of the peak."""
    assert nb03["peak_momentum_gamma"] < nb03["kfac_gamma"]
    assert nb03["peak_no_momentum_gamma"] < nb03["kfac_gamma"]
    assert nb03["smallest_gamma_momentum"] < 0.01 * nb03["peak_momentum"]
    assert nb03["smallest_gamma_no_momentum"] < 0.01 * nb03["peak_no_momentum"]


def test_03_momentum_improves_h_more_at_every_gamma(nb03):
    for g, v in _curves(nb03):
        assert v[MOM] > v[NOMOM], (g, v)


def test_03_kfac_gamma_was_still_falling_and_sits_above_the_peak(nb03):
    """Every γ search picked ω₂γ; reaching the peak takes several (≥ 3) more searches; at the star the
    re-scaled update with momentum gets more than half of the best improvement."""
    ratios = nb03["search_ratios"]
    assert ratios and all(math.isclose(r, nb03["omega2"], rel_tol=1e-6) for r in ratios), ratios
    assert nb03["searches_to_peak"] >= 3, nb03["searches_to_peak"]
    assert nb03["momentum_at_kfac_gamma"] > 0.5 * nb03["peak_momentum"]


# ---------------------------------------------------------------- 04: training
def _split(d: dict) -> tuple[list[float], list[float]]:
    kfac = [v for n, v in d.items() if n.startswith("K-FAC")]
    base = [v for n, v in d.items() if not n.startswith("K-FAC")]
    assert len(kfac) == 2 and len(base) == 2, d
    return kfac, base


def test_04_one_seed_150_kfac_iterations_and_more_for_the_baselines(nb04):
    assert nb04["seeds"] == 1 and nb04["kfac_iterations"] == 150
    kfac, base = _split(nb04["iterations_run"])
    assert max(kfac) == 150 and min(base) > 150, nb04["iterations_run"]


def test_04_kfac_saw_several_times_as_many_cases_by_iteration_150(nb04):
    kfac, base = _split(nb04["cases_by_kfac_iteration"])
    assert min(kfac) >= 3 * max(base), nb04["cases_by_kfac_iteration"]


def test_04_per_iteration_kfac_is_at_least_twice_as_low(nb04):
    kfac, base = _split(nb04["error_at_kfac_iteration"])
    assert 2 * max(kfac) <= min(base), nb04["error_at_kfac_iteration"]


def test_04_per_case_processed_kfac_is_ahead_of_both_baselines(nb04):
    kfac, base = _split(nb04["error_at_equal_cases"])
    assert max(kfac) < min(base), nb04["error_at_equal_cases"]


def test_04_at_equal_time_kfac_is_ahead_of_both_baselines(nb04):
    kfac, base = _split(nb04["error_at_equal_time"])
    assert max(kfac) < min(base), nb04["error_at_equal_time"]


def test_04_tridiagonal_is_ahead_of_block_diagonal_at_every_evaluation(nb04):
    assert nb04["tridiagonal_over_blockdiagonal_max"] < 1, nb04["tridiagonal_over_blockdiagonal_max"]


# ---------------------------------------------------------------- 06: K-FAC among the approximations
@pytest.fixture(scope="module")
def nb06(tmp_path_factory):
    return _numbers("06_approximations.ipynb", tmp_path_factory)


def test_06_orderings_of_the_dense_errors(nb06):
    """'EK-FAC's Frobenius error is never larger than F̆'s … no block-diagonal approximation can beat the exact
    diagonal blocks'; 'F̃ and F̂ … err least'."""
    e = nb06["dense_error"]
    assert e["ekfac"] <= e["kfac-blockdiag"] * (1 + 1e-9)
    assert e["blockdiag-exact"] <= e["ekfac"] * (1 + 1e-9)
    assert max(e["kfac"], e["kfac-tridiag"]) < min(e[k] for k in ("kfac-blockdiag", "ekfac", "diagonal",
                                                                  "blockdiag-exact"))


def test_06_block_diagonal_errors_are_more_than_half_and_the_diagonal_more_than_ninety_percent(nb06):
    e = nb06["dense_error"]
    assert min(e[k] for k in ("kfac-blockdiag", "ekfac", "blockdiag-exact")) > 0.5, e
    assert e["diagonal"] > 0.9, e


def test_06_matrix_free_estimates_are_within_a_few_percent(nb06):
    """'each lies within a few per cent of the dense value' (and the CG cosines match the dense ones)."""
    assert nb06["matrix_free_max_relative_gap"] < 0.05, nb06["matrix_free_max_relative_gap"]
    assert nb06["cosine_gap"] < 1e-4, nb06["cosine_gap"]


def test_06_kfac_is_almost_exact_at_initialisation_and_degrades_tenfold(nb06):
    """'under 1% at iteration 1' and 'grows by more than a factor of ten'; EK-FAC ≤ F̆ at every iteration."""
    assert nb06["kfac_error_first"] < 0.01, nb06["kfac_error_first"]
    assert nb06["kfac_error_last"] > 10 * nb06["kfac_error_first"]
    assert nb06["ekfac_never_worse"]

