"""Privacy accounting: ε from a history, and noise calibration that counts the past."""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from client.privacy import MIN_SIGMA, calibrate_noise, epsilon_spent
from common.errors import PolicyError

DELTA = 1e-5


def test_no_history_spends_nothing() -> None:
    assert epsilon_spent([], DELTA, "prv") == 0.0


def test_epsilon_matches_an_opacus_accountant_with_the_same_history() -> None:
    history = [(1.1, 0.05, 40), (0.9, 0.1, 20)]
    reference = RDPAccountant()
    reference.history = list(history)
    assert epsilon_spent(history, DELTA, "rdp") == pytest.approx(reference.get_epsilon(DELTA))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_rounds_accumulate_like_one_long_run(accountant: str) -> None:
    """Restoring the history each round equals one accountant living through all rounds."""
    per_round = [(1.0, 0.1, 10)] * 3
    assert epsilon_spent(per_round, DELTA, accountant) == pytest.approx(
        epsilon_spent([(1.0, 0.1, 30)], DELTA, accountant), rel=1e-3
    )
    one, two, three = (epsilon_spent(per_round[:n], DELTA, accountant) for n in (1, 2, 3))
    assert 0 < one < two < three


def test_calibration_from_scratch_agrees_with_opacus() -> None:
    sigma = calibrate_noise(
        [], sample_rate=0.1, steps=80, target_epsilon=4.0, delta=DELTA, accountant="rdp"
    )
    reference = get_noise_multiplier(
        target_epsilon=4.0, target_delta=DELTA, sample_rate=0.1, steps=80, accountant="rdp"
    )
    assert sigma == pytest.approx(reference, rel=0.02)
    assert epsilon_spent([(sigma, 0.1, 80)], DELTA, "rdp") <= 4.0


@pytest.mark.slow  # two PRV calibration searches (5-13 s)
def test_calibration_counts_what_was_already_spent() -> None:
    history = [(1.0, 0.1, 50)]
    fresh = calibrate_noise(
        [], sample_rate=0.1, steps=50, target_epsilon=6.0, delta=DELTA, accountant="prv"
    )
    after = calibrate_noise(
        history, sample_rate=0.1, steps=50, target_epsilon=6.0, delta=DELTA, accountant="prv"
    )
    assert after > fresh  # less budget left means more noise
    total = epsilon_spent([*history, (after, 0.1, 50)], DELTA, "prv")
    assert 5.9 <= total <= 6.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_budget_that_fits_the_noise_floor_gets_the_floor(accountant: str) -> None:
    """The floor is probed with RDP first for PRV (PRV at σ = 0.1 is very slow); when
    even the floor fits, both accountants return it."""
    sigma = calibrate_noise(
        [], sample_rate=0.01, steps=1, target_epsilon=90.0, delta=DELTA, accountant=accountant
    )
    assert sigma == MIN_SIGMA


@pytest.mark.slow  # PRV accounting in a calibration search (5-15 s)
def test_prv_calibration_is_the_smallest_noise_that_fits() -> None:
    """Skipping the PRV probe at the floor must not change the answer: the σ found fits
    the target and a slightly smaller one does not."""
    history = [(1.47, 0.1, 120)]
    sigma = calibrate_noise(
        history, sample_rate=0.1, steps=120, target_epsilon=8.0, delta=DELTA, accountant="prv"
    )
    assert epsilon_spent([*history, (sigma, 0.1, 120)], DELTA, "prv") <= 8.0
    assert epsilon_spent([*history, (sigma - 0.01, 0.1, 120)], DELTA, "prv") > 7.95


def test_a_spent_budget_cannot_be_calibrated() -> None:
    history = [(0.5, 0.5, 200)]
    assert epsilon_spent(history, DELTA, "rdp") > 3.0
    with pytest.raises(PolicyError, match="already spent"):
        calibrate_noise(
            history, sample_rate=0.1, steps=10, target_epsilon=3.0, delta=DELTA, accountant="rdp"
        )


@pytest.mark.parametrize("sigma", [float("inf"), float("nan"), 0.0, -1.0])
def test_an_invalid_history_entry_is_refused_not_computed(sigma: float) -> None:
    with pytest.raises(PolicyError, match="invalid privacy history entry"):
        epsilon_spent([(sigma, 0.1, 10)], DELTA, "rdp")
