"""Is a difference between two runs real? Paired per-case statistics on ``scipy.stats``.

Two runs (or an experiment and its study's baseline) scored on the same cases are compared case by
case on one metric (``docs/statistics.md`` explains every figure):

* per case, the metric averaged over the seeds that ran (:func:`seed_average`), then the
  difference A - B on the cases both sides have a value for;
* the mean difference with a 95 % bootstrap confidence interval, cases resampled
  (:func:`bootstrap_ci`: ``scipy.stats.bootstrap``, BCa, 9999 resamples, fixed seed);
* the paired Wilcoxon signed-rank p-value (:func:`wilcoxon_test`: ``scipy.stats.wilcoxon``);
  zero differences are dropped (Wilcoxon's own rule), tied magnitudes get average ranks;
* Holm's step-down correction across a study's comparisons (:func:`holm`, :func:`holm_adjust`);
* a verdict in words (:func:`verdict`): ``better``, ``worse`` or ``no detectable difference``,
  for A against B, with "better" meaning lower for metrics such as ``hd95*``, ``*_mae`` and
  ``avd`` (:func:`lower_is_better`);
* beside it each side's spread over cases and, where several seeds ran, over seeds (:class:`Side`).

Input per side: ``{seed: {case id: value}}`` (one entry for a single run).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as st

from medseg_monai.errors import InputError

__all__ = [
    "BETTER",
    "NO_DIFFERENCE",
    "WORSE",
    "Paired",
    "Side",
    "bootstrap_ci",
    "holm",
    "holm_adjust",
    "lower_is_better",
    "paired",
    "seed_average",
    "side_spread",
    "verdict",
    "wilcoxon_test",
]

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"
ALPHA = 0.05
CONFIDENCE = 0.95
N_RESAMPLES = 9999
# name parts of metrics where lower is better: distances, errors, volume differences, losses
_LOWER_PARTS = {"hd", "hd95", "hausdorff", "asd", "assd", "avd", "mae", "rmse", "error", "loss"}
# differences are rounded before ranking: 0.9 - 0.8 and 0.7 - 0.6 differ in the last bit, and
# Wilcoxon's ranks must see them as the tie they are (scipy's docs give the same advice)
_DECIMALS = 12
_EXACT_MAX_N = 50  # exact null distribution up to here (scipy's own limit)
_PERMUTATION_MAX_N = 13  # with ties: every one of the 2**n sign patterns (2**13 < 9999 resamples)


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is the better one: a name with a part such as ``hd95``,
    ``mae``, ``avd`` or ``loss`` (``hd95_vox_lv_cavity``, ``ef_lv_mae``, ``challenge_avd``)."""
    return bool(_LOWER_PARTS & set(metric.lower().split("_")))


def seed_average(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per case, the mean of its values over the seeds (``{seed: {case: value}}``), NaN values left
    out (NaN where every seed has NaN). Seeds of one experiment must have scored the same cases."""
    if not scores:
        raise InputError("no runs to average")
    case_sets = {seed: set(cases) for seed, cases in scores.items()}
    first_seed, first = next(iter(case_sets.items()))
    for seed, cases in case_sets.items():
        if cases != first:
            raise InputError(
                f"seeds {first_seed} and {seed} were scored on different cases "
                f"({len(first ^ cases)} differ): a paired comparison needs one case set per side"
            )
    out = {}
    for case in scores[first_seed]:
        values = [float(s[case]) for s in scores.values() if not math.isnan(float(s[case]))]
        out[case] = statistics.fmean(values) if values else math.nan
    return out


@dataclass(frozen=True)
class Side:
    """One side of a comparison on the compared cases: ``mean`` of the seed-averaged per-case values,
    ``case_sd`` their standard deviation over cases (how much cases differ), ``seed_sd`` the
    standard deviation over seeds of each seed's mean over the cases (how much retraining moves the
    result; None with one seed), ``seeds`` how many ran."""

    mean: float
    case_sd: float
    seed_sd: float | None
    seeds: int


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def side_spread(scores: Mapping[str, Mapping[str, float]], cases: Sequence[str]) -> Side:
    """:class:`Side` of ``scores`` (``{seed: {case: value}}``) over ``cases``."""
    averaged = seed_average(scores)
    values = [averaged[c] for c in cases]
    per_seed = [
        statistics.fmean(v) for s in scores.values() if (v := [s[c] for c in cases if not math.isnan(s[c])])
    ]
    seed_sd = _sd(per_seed) if len(scores) > 1 else None
    return Side(statistics.fmean(values), _sd(values), seed_sd, len(scores))


def bootstrap_ci(
    differences: Sequence[float],
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The ``confidence`` interval of the mean of ``differences`` by resampling cases
    (``scipy.stats.bootstrap``, BCa, ``n_resamples`` draws from a generator seeded with ``seed``,
    so a rebuild gives the same figures). Identical differences give their value as both bounds
    (the resamples cannot vary; BCa would be NaN)."""
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        raise InputError(f"a bootstrap interval needs at least 2 cases, got {d.size}")
    if np.ptp(d) == 0:
        return float(d[0]), float(d[0])
    res = st.bootstrap(
        (d,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def wilcoxon_test(differences: Sequence[float]) -> tuple[float, str, int]:
    """Two-sided paired Wilcoxon signed-rank test of ``differences`` (A - B per case):
    ``(p, method, n)`` with ``n`` the non-zero differences the test used.

    Zero differences (a case both runs scored the same, e.g. both 1.0) say nothing about which run
    is better and are dropped before ranking (``zero_method="wilcox"``, Wilcoxon's rule); tied
    magnitudes share their average rank. The p-value is exact where it can be: from the exact null
    distribution without ties (n <= 50), from all 2**n sign patterns with ties (n <= 13), else from
    the normal approximation with the tie-corrected variance and no continuity correction. No
    non-zero difference gives p = 1."""
    d = np.round(np.asarray(differences, dtype=float), _DECIMALS)
    d = d[d != 0]
    n = int(d.size)
    if n == 0:
        return 1.0, "no differences", 0
    ties = np.unique(np.abs(d)).size < n
    if not ties and n <= _EXACT_MAX_N:
        method, how = "exact", "exact"
    elif ties and n <= _PERMUTATION_MAX_N:
        method, how = st.PermutationMethod(n_resamples=N_RESAMPLES), "exact (all sign patterns, ties)"
    else:
        method, how = "asymptotic", "normal approximation"
    p = float(st.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method=method).pvalue)
    return min(p, 1.0), how, n


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of ``pvalues`` (None: a comparison that could not be made; it
    neither counts nor changes). The k-th smallest of m p-values is multiplied by m - k + 1, each
    adjusted value is at least the one before it (step-down) and at most 1."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(order)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out


def verdict(
    mean_difference: float,
    ci: tuple[float, float],
    p: float,
    lower_better: bool,
    alpha: float = ALPHA,
) -> str:
    """A against B in words: ``better`` or ``worse`` when the (Holm-adjusted) Wilcoxon p is below
    ``alpha`` *and* the bootstrap interval of the mean difference excludes 0 on the same side; else
    ``no detectable difference`` (including when the two disagree, e.g. a few outlying cases)."""
    low, high = ci
    # the interval excludes 0 on the side of the mean difference (BCa bounds need not straddle it)
    same_side = (mean_difference > 0 and low > 0) or (mean_difference < 0 and high < 0)
    if p >= alpha or not same_side:
        return NO_DIFFERENCE
    return BETTER if (mean_difference < 0) == lower_better else WORSE


@dataclass(frozen=True)
class Paired:
    """The paired comparison A - B of one metric (see the module's docstring).

    ``cases``: the compared cases; ``left_out``: cases not compared and why (``only_a``, ``only_b``,
    ``nan``: no value on one side); ``ci``: the bootstrap interval of ``mean_difference``;
    ``p_value``: Wilcoxon's, ``p_holm`` after Holm's correction (equal for a single comparison);
    ``note``: why the test cannot reach ``alpha`` when too few cases differ."""

    metric: str
    lower_is_better: bool
    cases: list[str]
    a: Side
    b: Side
    mean_difference: float
    median_difference: float
    ci: tuple[float, float]
    p_value: float
    p_holm: float
    test: str
    n_nonzero: int
    verdict: str
    alpha: float = ALPHA
    note: str = ""
    left_out: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """Plain values for JSON."""
        return dataclasses.asdict(self)


def paired(
    a: Mapping[str, Mapping[str, float]],
    b: Mapping[str, Mapping[str, float]],
    metric: str,
    *,
    lower_better: bool | None = None,
    alpha: float = ALPHA,
    seed: int = 0,
) -> Paired:
    """Compare ``a`` with ``b`` (each ``{seed: {case: value}}`` of ``metric``) on the cases both
    scored with a value: per-case seed means, then :func:`bootstrap_ci`, :func:`wilcoxon_test` and
    :func:`verdict` (``lower_better`` default: :func:`lower_is_better` of ``metric``). Refused with
    fewer than 2 such cases."""
    lower = lower_is_better(metric) if lower_better is None else lower_better
    mean_a, mean_b = seed_average(a), seed_average(b)
    common = [c for c in mean_a if c in mean_b]
    nan = [c for c in common if math.isnan(mean_a[c]) or math.isnan(mean_b[c])]
    cases = [c for c in common if c not in nan]
    left_out = {
        "only_a": [c for c in mean_a if c not in mean_b],
        "only_b": [c for c in mean_b if c not in mean_a],
        "nan": nan,
    }
    if len(cases) < 2:
        raise InputError(
            f"{metric}: {len(cases)} case(s) scored with a value by both sides "
            f"({len(common)} in common, {len(nan)} of them NaN): a paired comparison needs at least 2"
        )
    d = [mean_a[c] - mean_b[c] for c in cases]
    ci = bootstrap_ci(d, seed=seed)
    p, test, n_nonzero = wilcoxon_test(d)
    mean_d = statistics.fmean(d)
    return Paired(
        metric=metric,
        lower_is_better=lower,
        cases=cases,
        a=side_spread(a, cases),
        b=side_spread(b, cases),
        mean_difference=mean_d,
        median_difference=statistics.median(d),
        ci=ci,
        p_value=p,
        p_holm=p,
        test=test,
        n_nonzero=n_nonzero,
        verdict=verdict(mean_d, ci, p, lower, alpha),
        alpha=alpha,
        note=_power_note(n_nonzero, alpha),
        left_out=left_out,
    )


def _power_note(n_nonzero: int, alpha: float) -> str:
    """Why no verdict can come out of so few differing cases: the smallest two-sided p of the
    signed-rank test with n non-zero differences is 2 / 2**n (all of one sign, no ties)."""
    smallest = 2.0 / 2**n_nonzero
    if smallest < alpha:
        return ""
    return (
        f"only {n_nonzero} case(s) differ: the signed-rank test cannot reach p < {alpha:g} "
        f"(smallest possible p {smallest:.3g})"
    )


def holm_adjust(comparisons: Sequence[Paired]) -> list[Paired]:
    """``comparisons`` (one study's experiments against its baseline) with ``p_holm`` and the
    verdict from Holm's correction across them."""
    adjusted = holm([c.p_value for c in comparisons])
    return [
        dataclasses.replace(
            c, p_holm=p, verdict=verdict(c.mean_difference, c.ci, p, c.lower_is_better, c.alpha)
        )
        for c, p in zip(comparisons, adjusted, strict=True)
        if p is not None
    ]
