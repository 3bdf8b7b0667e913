"""Statistics for seed-paired comparisons: bounded t intervals, exact sign-flip p-values, Holm's adjustment.

The choices, as every table names them:
- intervals: 95% Student-t, computed on the logit scale of the value's range ([0, 1] for an accuracy,
  [-1, 1] for a difference of accuracies) and mapped back, so they never leave the range. Over seeds they
  cover seed-to-seed variation (initialisation, data order, augmentation) on one fixed test set: they say
  nothing about another test set, whose own sampling error is `binomial_se`;
- p-values: the two-sided sign-flip (paired permutation) test of "the mean difference is 0": under that
  hypothesis each seed's difference is as likely to have either sign, so p is the share of all 2**n sign
  patterns whose |sum| is at least the observed one. Exact up to n = `EXACT_MAX` (65,536 patterns), a seeded
  Monte-Carlo estimate beyond (`(1 + hits) / (1 + draws)`, never 0). Zero differences count in n and flip to
  themselves; with n seeds no p-value can be below 2 / 2**n (0.0625 for 5 seeds, 0.0078 for 8);
- multiple comparisons: Holm's step-down adjustment over a family (the comparisons that answer one question
  in one report); a verdict is "BNET higher" or "BN higher" when the adjusted p is below `ALPHA`, else
  "cannot tell".
"""
from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

ALPHA = 0.05
EXACT_MAX = 16  # up to 2**16 sign patterns are enumerated; beyond, Monte-Carlo
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


def sign_flip_p(differences, exact_max: int = EXACT_MAX, draws: int = DRAWS, seed: int = 0) -> tuple[float, str]:
    """Two-sided sign-flip p-value of paired `differences` and how it was computed ("exact, 2^n patterns"
    or "Monte-Carlo, N draws, seed S"); NaN for no differences."""
    d = np.asarray(differences, dtype=float)
    n = len(d)
    if n == 0:
        return float("nan"), "no pairs"
    observed = abs(d.sum())
    tolerance = 1e-9 * max(np.abs(d).sum(), 1e-300)  # sums equal up to rounding count as reaching it
    if n <= exact_max:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d) >= observed - tolerance)), f"exact, 2^{n} patterns"
    rng, hits, left = np.random.default_rng(seed), 0, draws
    while left:
        batch = min(left, 10_000)
        signs = rng.choice((-1.0, 1.0), size=(batch, n))
        hits += int(np.sum(np.abs(signs @ d) >= observed - tolerance))
        left -= batch
    return (1 + hits) / (1 + draws), f"Monte-Carlo, {draws} draws, seed {seed}"


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
