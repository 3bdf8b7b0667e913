"""Statistics for seed-paired comparisons: bounded t intervals, exact sign-flip p-values, Holm's adjustment.

The choices, as every table names them:
- intervals: 95% Student-t, computed on the logit scale of the value's range ([0, 1] for an accuracy,
  [-1, 1] for a difference of accuracies) and mapped back, so they never leave the range. Over seeds they
  cover seed-to-seed variation (initialisation, data order, augmentation) on one fixed test set: they say
  nothing about another test set, whose own sampling error is `binomial_se`;
- p-values: the two-sided sign-flip (paired permutation) test of "the mean difference is 0": under that
  hypothesis each seed's difference is as likely to have either sign, so p is the share of all 2**n sign
  patterns whose |sum| is at least the observed one. Every pattern is counted up to n = `EXACT_MAX` (2**40
  patterns, by meeting in the middle: the 2**(n/2) sums of each half, one half sorted), a seeded Monte-Carlo
  estimate beyond (`(1 + hits) / (1 + draws)`, never 0). Ties decide p: the report passes differences in
  *counts of correct test images* (`to_counts`), whole numbers, and whole-number differences are compared
  exactly (two sums that differ differ by at least 1). Other differences reach the observed sum when within
  1e-9 of Σ|d| of it, far above float64's rounding of such sums (an equal-cost difference, BN interpolated
  between budgets, is a count plus a fraction of a count). Zero differences count in n and flip to
  themselves; with n seeds no p-value can be below 2 / 2**n (0.0625 for 5 seeds, 0.0078 for 8);
- multiple comparisons: Holm's step-down adjustment over a family (the comparisons that answer one question
  in one report); a verdict is "BNET higher" or "BN higher" when the adjusted p is below `ALPHA`, else
  "cannot tell".
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats

ALPHA = 0.05
EXACT_MAX = 40  # up to 2**40 sign patterns are counted (two halves of 2**20 sums); beyond, Monte-Carlo
DRAWS = 100_000  # Monte-Carlo sign patterns beyond EXACT_MAX
CI_METHOD = "95% Student-t on the logit scale"  # named in every table that carries an interval
P_METHOD = "two-sided sign-flip permutation"


def t_interval(values) -> tuple[float, float]:
    """95% Student's t interval of the mean of `values` (NaN for fewer than two values)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    half = scipy_stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def bounded_t_interval(values, low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
    """95% t interval for values bounded in [low, high]: computed on the logit of their position in the
    range and mapped back, so it never leaves [low, high]. Values on a bound are moved 1e-6 of the range
    inside it (a logit of 0 or 1 is infinite)."""
    values = np.asarray(values, dtype=float)
    share = np.clip((values - low) / (high - low), 1e-6, 1 - 1e-6)
    lo, hi = t_interval(np.log(share / (1 - share)))
    return tuple(float(low + (high - low) / (1 + np.exp(-v))) for v in (lo, hi))


def _half_sums(d: np.ndarray) -> np.ndarray:
    """The 2**len(d) sums of ±d."""
    sums = np.zeros(1)
    for value in d:
        sums = np.concatenate([sums + value, sums - value])
    return sums


def sign_flip_p(differences, exact_max: int = EXACT_MAX, draws: int = DRAWS, seed: int = 0) -> tuple[float, str]:
    """Two-sided sign-flip p-value of paired `differences` and how it was computed ("exact, 2^n patterns"
    or "Monte-Carlo, N draws, seed S"); NaN for no differences. Whole-number differences (counts) are
    compared exactly; others with a tolerance of 1e-9 of Σ|d| (see the module docstring)."""
    d = np.asarray(differences, dtype=float)
    n = len(d)
    if n == 0:
        return float("nan"), "no pairs"
    if not np.isfinite(d).all():
        raise ValueError(f"sign-flip p of differences that are not finite numbers: {d.tolist()}")
    observed = abs(d.sum())
    whole = bool(np.all(d == np.round(d))) and np.abs(d).sum() < 2 ** 52
    # whole numbers: sums are exact in float64, and a sum that is not a tie is at least 1 away
    reach = observed - (0.5 if whole else 1e-9 * max(np.abs(d).sum(), 1e-300))
    if reach <= 0:  # every pattern reaches |sum| >= 0
        return 1.0, f"exact, 2^{n} patterns"
    if n <= exact_max:
        left, right = _half_sums(d[: n // 2]), np.sort(_half_sums(d[n // 2:]))
        # pairs whose total is >= reach or <= -reach (disjoint, as reach > 0)
        hits = (len(right) - np.searchsorted(right, reach - left, side="left")).sum() \
            + np.searchsorted(right, -reach - left, side="right").sum()
        return float(int(hits) / 2 ** n), f"exact, 2^{n} patterns"
    rng, hits, left = np.random.default_rng(seed), 0, draws
    while left:
        batch = min(left, 10_000)
        signs = rng.choice((-1.0, 1.0), size=(batch, n))
        hits += int(np.sum(np.abs(signs @ d) >= reach))
        left -= batch
    return (1 + hits) / (1 + draws), f"Monte-Carlo, {draws} draws, seed {seed}"


def to_counts(accuracies, n_valid) -> np.ndarray | None:
    """Accuracies as counts of correct test images (accuracy × n_valid, rounded), or None when they are not
    such counts: n_valid unknown, or an accuracy more than 0.01 image from a whole count (a stored float32
    accuracy of a count out of 10,000 images is within 0.001 of it)."""
    a, n = np.asarray(accuracies, dtype=float), np.asarray(n_valid, dtype=float)
    if not (np.isfinite(n).all() and (n > 0).all() and np.isfinite(a).all()):
        return None
    counts = np.round(a * n)
    return counts if np.all(np.abs(a * n - counts) <= 0.01) else None


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the order given; NaN entries are not tests and stay NaN."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))  # never below an earlier (smaller) one
        adjusted[index] = running
    return adjusted


def verdict(mean_difference: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    """"BNET higher", "BN higher" or "cannot tell", from the sign of the difference and its adjusted p."""
    if np.isnan(p_adjusted) or p_adjusted >= alpha or mean_difference == 0:
        return "cannot tell"
    return "BNET higher" if mean_difference > 0 else "BN higher"


def binomial_se(accuracy: float, n: float) -> float:
    """Standard error of an accuracy measured on `n` test images: sqrt(a (1 - a) / n); the test set's own
    sampling error, which intervals over seeds on one fixed test set do not include."""
    return float(np.sqrt(accuracy * (1 - accuracy) / n)) if n and n > 0 else float("nan")


def sign_flip_power(effect: float, n: int, alpha: float, draws: int = 2000, seed: int = 0) -> float:
    """The share of `draws` simulated studies of n paired seeds, each difference Normal(effect, 1) (the effect in
    units of the seed-to-seed SD of the difference), whose exact sign-flip p is at most `alpha`: the power to
    reach a verdict. With Holm over m comparisons, alpha = 0.05 / m gives its lower bound (Holm's first step)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([sign_flip_p(rng.normal(effect, 1.0, n))[0] <= alpha for _ in range(draws)]))


def seeds_for_power(effect: float, alpha: float, power: float = 0.8, most: int = 30, draws: int = 2000) -> int | None:
    """The fewest paired seeds whose `sign_flip_power` reaches `power` (None within `most`)."""
    return next((n for n in range(2, most + 1) if 2 / 2 ** n <= alpha
                 and sign_flip_power(effect, n, alpha, draws) >= power), None)



def seeds_needed(family_size: int, alpha: float = ALPHA) -> int:
    """The fewest paired seeds whose smallest exact two-sided sign-flip p (2/2ⁿ, every seed on one side), times
    the Holm family's size (Holm's first step), is below `alpha`: with fewer, no comparison can be decided."""
    return max(1, math.floor(math.log2(2 * family_size / alpha)) + 1)
