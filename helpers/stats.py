r"""Paired comparisons of two methods run on the same seeds: a t-interval, an exact sign-flip test, TOST.

Method A and method B ran on the same :math:`n` seeds (a seed fixes the partition, the initialisation and
the sampling), with accuracies :math:`a_i, b_i`. Pairing cancels what the seeds share, so the evidence is
in the paired differences :math:`d_i = 100\,(a_i - b_i)` (percentage points) alone:

.. math::  \bar d \pm t_{1-\gamma/2,\,n-1}\, \frac{s_d}{\sqrt n}, \qquad \gamma = 1 - \text{confidence},

the exact sign-flip permutation p-value (under "no difference" each :math:`d_i` is as likely to be
:math:`-d_i`; all :math:`2^n` sign patterns are enumerated) and the two one-sided tests (TOST) of
equivalence within :math:`\pm m`, a margin stated before looking. One verdict, from A's side:

* ``"equivalent"``: the interval lies inside :math:`(-m, m)`;
* ``"better"`` / ``"worse"``: otherwise, the interval lies above / below 0;
* ``"undecided"``: anything else -- *not* "no difference": more seeds could decide it.

All quantiles and p-values come from :mod:`scipy.stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence, TypeVar

import numpy as np
from scipy import stats as sps

__all__ = ["VERDICTS", "Paired", "paired", "simplest_equivalent"]

VERDICTS = ("better", "worse", "equivalent", "undecided")
K = TypeVar("K")


@dataclass(frozen=True)
class Paired:
    """A paired comparison of A against B (see :func:`paired`); every difference in percentage points."""

    diffs_pp: tuple[float, ...]   # 100 (a_i - b_i), seed by seed
    mean_pp: float
    ci_low_pp: float
    ci_high_pp: float
    confidence: float
    margin_pp: float
    p_sign_flip: float            # exact two-sided sign-flip permutation p-value of "mean difference 0"
    p_equivalence: float          # TOST p-value of "|true difference| >= margin" (small: equivalent)
    verdict: str

    @property
    def n(self) -> int:
        return len(self.diffs_pp)

    def firm(self, drift_pp: float) -> bool:
        r"""Whether the verdict survives every accuracy moving by up to ``drift_pp`` (another CPU's rounding).

        Each :math:`d_i` then moves by at most :math:`e = 2\,\mathrm{drift}`, so :math:`\bar d` moves by at most
        :math:`e` and :math:`s_d` by at most :math:`e\sqrt{n/(n-1)}` (the centred differences move by at most
        :math:`e\sqrt n` in Euclidean norm). The verdict is firm when it holds at every combination of those
        bounds; the check is conservative: it may call a verdict not firm that would in fact survive."""
        if not math.isfinite(drift_pp) or drift_pp < 0:
            raise ValueError(f"drift_pp must be a finite number >= 0, got {drift_pp!r}")
        n, e = self.n, 2 * drift_pp
        k = float(sps.t.ppf(0.5 + self.confidence / 2, n - 1)) / math.sqrt(n)
        sd = float(np.std(self.diffs_pp, ddof=1))
        sd_lo, sd_hi = max(0.0, sd - e * math.sqrt(n / (n - 1))), sd + e * math.sqrt(n / (n - 1))
        low_min, low_max = self.mean_pp - e - k * sd_hi, self.mean_pp + e - k * sd_lo
        high_min, high_max = self.mean_pp - e + k * sd_lo, self.mean_pp + e + k * sd_hi
        m = self.margin_pp
        never_equivalent = low_max <= -m or high_min >= m or 2 * k * sd_lo >= 2 * m
        if self.verdict == "equivalent":
            return low_min > -m and high_max < m
        if self.verdict == "better":
            return low_min > 0 and never_equivalent
        if self.verdict == "worse":
            return high_max < 0 and never_equivalent
        return low_max <= 0 and high_min >= 0 and never_equivalent

    def explain(self, a: str, b: str) -> str:
        """The verdict in words with its numbers, for the prose (``a`` and ``b`` name the methods)."""
        ci = (f"mean paired difference {self.mean_pp:+.2f} pp over {self.n} seeds, "
              f"{100 * self.confidence:.0f}% interval {self.ci_low_pp:+.2f} to {self.ci_high_pp:+.2f} pp")
        tests = f"sign-flip p = {self.p_sign_flip:.3f}"
        if self.verdict == "equivalent":
            return (f"{a} and {b} are equivalent within ±{self.margin_pp:g} pp: {ci}, inside the margin "
                    f"(TOST p = {self.p_equivalence:.3f})")
        if self.verdict in ("better", "worse"):
            return f"{a} is {self.verdict} than {b}: {ci}, which excludes 0 ({tests})"
        return (f"{a} against {b} is undecided at this budget: {ci}, which neither excludes 0 nor lies "
                f"within the ±{self.margin_pp:g} pp margin ({tests})")

    def glue_values(self, name: str) -> dict[str, float | int | str]:
        """The book's glue names for comparison ``name``: ``name_diff_pp``, ``_ci_low_pp``, ``_ci_high_pp``,
        ``_n``, ``_margin_pp`` and ``_verdict`` (rounded to the two decimals the prose shows)."""
        return {f"{name}_diff_pp": round(self.mean_pp, 2), f"{name}_ci_low_pp": round(self.ci_low_pp, 2),
                f"{name}_ci_high_pp": round(self.ci_high_pp, 2), f"{name}_n": self.n,
                f"{name}_margin_pp": self.margin_pp, f"{name}_verdict": self.verdict}


def _sign_flip_p(d: np.ndarray) -> float:
    if not np.any(d):
        return 1.0
    res = sps.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), vectorized=True,
                               permutation_type="samples", n_resamples=np.inf, alternative="two-sided")
    return float(min(1.0, res.pvalue))


def paired(a: Sequence[float], b: Sequence[float], *, margin_pp: float, confidence: float = 0.95) -> Paired:
    r"""Compare method A (accuracies ``a``, one per seed, as fractions) with method B on the same seeds.

    ``margin_pp`` is the equivalence margin in percentage points, stated before looking at the results.
    Returns the paired differences, their mean and t-interval at ``confidence``, the exact sign-flip
    p-value, the TOST p-value and the verdict (module docstring)."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape or len(a_arr) < 2:
        raise ValueError(f"a and b must be equally long sequences of >= 2 paired results, got {len(a)} and {len(b)}")
    if not (np.all(np.isfinite(a_arr)) and np.all(np.isfinite(b_arr))):
        raise ValueError("a and b must be finite (a diverged run is a bug to fix, not a result)")
    if isinstance(margin_pp, bool) or not isinstance(margin_pp, (int, float)) or not 0 < margin_pp < math.inf:
        raise ValueError(f"margin_pp must be a positive number of percentage points, got {margin_pp!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, float) or not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be a float in [0.5, 1), got {confidence!r}")
    d = 100.0 * (a_arr - b_arr)
    n, mean = len(d), float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se > 0:
        low, high = (float(x) for x in sps.t.interval(confidence, n - 1, loc=mean, scale=se))
        p_eq = max(float(sps.t.sf((mean + margin_pp) / se, n - 1)), float(sps.t.cdf((mean - margin_pp) / se, n - 1)))
    else:   # every seed gave the same difference
        low = high = mean
        p_eq = 0.0 if abs(mean) < margin_pp else 1.0
    if -margin_pp < low and high < margin_pp:
        verdict = "equivalent"
    elif low > 0:
        verdict = "better"
    elif high < 0:
        verdict = "worse"
    else:
        verdict = "undecided"
    return Paired(diffs_pp=tuple(float(x) for x in d), mean_pp=mean, ci_low_pp=low, ci_high_pp=high,
                  confidence=confidence, margin_pp=float(margin_pp), p_sign_flip=_sign_flip_p(d),
                  p_equivalence=p_eq, verdict=verdict)


def simplest_equivalent(scores: Mapping[K, Sequence[float]], *, margin_pp: float) -> K:
    """Choose a setting on validation: the first key of ``scores`` (list them simplest first) whose paired
    comparison with the best mean is ``"equivalent"`` within ``margin_pp``, or the best when none is.
    ``scores[k]`` holds setting k's validation accuracies, one per seed (the same seeds for every k)."""
    if not scores:
        raise ValueError("scores is empty: nothing to choose from")
    best = max(scores, key=lambda k: float(np.mean(scores[k])))
    for key, accs in scores.items():
        if key == best or paired(accs, scores[best], margin_pp=margin_pp).verdict == "equivalent":
            return key
    return best
