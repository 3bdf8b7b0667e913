"""bnet_fastai.analysis.stats on cases computed by hand."""
import numpy as np
import pytest

from bnet_fastai.analysis.stats import binomial_se, holm, sign_flip_p, to_counts, verdict


class TestSignFlip:
    def test_five_positive_differences_give_two_of_32_patterns(self):
        p, method = sign_flip_p([0.01, 0.02, 0.005, 0.03, 0.012])
        assert p == 2 / 32 == 0.0625 and method == "exact, 2^5 patterns"

    def test_eight_same_sign_is_the_smallest_p_eight_seeds_allow(self):
        assert sign_flip_p(-np.arange(1, 9) / 100)[0] == 2 / 256

    def test_ties_count_every_pattern_that_reaches_the_observed_sum(self):
        # four +1 and one -1: sum 3; k plus signs give 2k - 5, |2k - 5| >= 3 for k in 0, 1, 4, 5: 1+5+5+1 of 32
        assert sign_flip_p([1, 1, 1, 1, -1])[0] == 12 / 32

    def test_zeros_flip_to_themselves(self):
        # nonzero 2, 2, 1: only +++ and --- reach |5|, each once per pattern of the two zeros: 2*4 of 32
        assert sign_flip_p([2, 2, 1, 0, 0])[0] == 8 / 32
        assert sign_flip_p([1, 1, -1, 0])[0] == 1.0  # every pattern of 1, 1, -1 has |sum| >= 1
        assert sign_flip_p([0, 0, 0])[0] == 1.0

    def test_twenty_pairs_are_counted_exactly(self):
        d = np.full(20, 0.01)
        assert sign_flip_p(d) == (2 / 2 ** 20, "exact, 2^20 patterns")
        # 19 of +1 and one -1: sum 18; k plus signs give 2k - 20, |2k - 20| >= 18 for k in 0, 1, 19, 20
        assert sign_flip_p([1] * 19 + [-1])[0] == (1 + 20 + 20 + 1) / 2 ** 20

    def test_beyond_forty_pairs_a_seeded_monte_carlo_that_is_never_zero(self):
        d = np.full(41, 0.01)
        p, method = sign_flip_p(d, draws=20_000)
        assert method == "Monte-Carlo, 20000 draws, seed 0" and p == sign_flip_p(d, draws=20_000)[0]
        assert p == 1 / 20_001  # exact: 2 / 2**41, so no hit
        mixed = np.array([1.0, -1.0] * 21)  # sum 0: every pattern reaches it
        assert sign_flip_p(mixed, draws=1000)[0] == 1.0

    def test_ties_between_counts_are_exact_where_stored_float32_accuracies_missed_them(self):
        # BNET - BN in correct images out of 10,000: -3, +3, +3, +3, +6, sum 12. By hand, |±3 ±3 ±3 ±3 ±6| >= 12:
        # all five one sign (±18: 2 patterns) and 6 with three of the 3s against one (±12: 4 + 4 patterns)
        counts = np.array([-3, 3, 3, 3, 6])
        assert sign_flip_p(counts) == (10 / 32, "exact, 2^5 patterns")
        # the same runs' accuracies as history.csv stores them (float32): the ±12 ties now differ in the 16th
        # digit, beyond a relative 1e-9 tolerance, and were missed (0.25 = 8 / 32); as counts they are exact
        bn = np.array([8086, 7936, 7922, 7926, 8045])
        bnet_acc, bn_acc = np.float32((bn + counts) / 1e4).astype(float), np.float32(bn / 1e4).astype(float)
        signs = 1 - 2 * ((np.arange(32)[:, None] >> np.arange(5)) & 1)
        d = bnet_acc - bn_acc
        assert np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-9 * np.abs(d).sum()) == 8 / 32  # the old rule
        assert (to_counts(bnet_acc, 10_000) - to_counts(bn_acc, 10_000)).tolist() == counts.tolist()
        assert to_counts([0.80035], 10_000) is None and to_counts([0.8], float("nan")) is None

    def test_agrees_with_full_enumeration_written_out(self):
        rng = np.random.default_rng(3)
        d = rng.normal(0.3, 1, size=7)
        hits = 0
        for pattern in range(2 ** 7):
            signs = np.array([1 if pattern >> i & 1 else -1 for i in range(7)])
            hits += abs((signs * d).sum()) >= abs(d.sum()) - 1e-12
        assert sign_flip_p(d)[0] == hits / 128


class TestHolm:
    def test_textbook_example(self):
        # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.06
        assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])

    def test_capped_at_one_and_nan_is_not_a_test(self):
        adjusted = holm([0.5, np.nan, 0.02])  # two tests: 0.02 x 2, then max(0.04, 0.5 x 1)
        assert adjusted[0] == 0.5 and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
        assert list(holm([0.6, 0.7])) == [1.0, 1.0]  # 0.6 x 2 capped at 1; 0.7 never below it

    def test_one_test_is_not_adjusted(self):
        assert holm([0.03]) == pytest.approx([0.03])


def test_verdict_follows_the_adjusted_p_and_the_sign():
    assert verdict(0.01, 0.01) == "BNET higher" and verdict(-0.01, 0.049) == "BN higher"
    assert verdict(0.01, 0.05) == "cannot tell" and verdict(0.01, np.nan) == "cannot tell"


def test_binomial_standard_error_of_a_test_set():
    assert binomial_se(0.84, 10_000) == pytest.approx(np.sqrt(0.84 * 0.16 / 10_000))
    assert np.isnan(binomial_se(0.8, np.nan))


def test_power_of_the_sign_flip_test_by_hand():
    from scipy.stats import norm

    from bnet_fastai.analysis.stats import seeds_for_power, sign_flip_power

    # 3 seeds at alpha 0.25: p <= 0.25 only when all three share a sign (p = 2/8), so the power is
    # Phi(e)^3 + (1 - Phi(e))^3: 0.25 with no effect, 0.5995 with an effect of one SD
    for effect in (0.0, 1.0):
        exact = norm.cdf(effect) ** 3 + norm.cdf(-effect) ** 3
        assert sign_flip_power(effect, 3, 0.25, draws=20_000) == pytest.approx(exact, abs=0.01)
    assert sign_flip_power(5.0, 5, 0.05 / 8) == 0.0  # 5 seeds can never reach 0.00625: 2/32 is the least p
    assert sign_flip_power(5.0, 10, 0.05 / 8) == 1.0
    assert seeds_for_power(2.0, 0.05 / 8, draws=500) == 9  # 8 seeds cannot pass 0.05/8 at all (2/256 > 0.00625)
