"""medseg_monai.stats against values worked out by hand on small arrays."""

from __future__ import annotations

import math

import pytest

from medseg_monai.errors import InputError
from medseg_monai.stats import (
    BETTER,
    NO_DIFFERENCE,
    WORSE,
    bootstrap_ci,
    holm,
    holm_adjust,
    lower_is_better,
    paired,
    seed_average,
    side_spread,
    verdict,
    wilcoxon_test,
)


def test_lower_is_better_from_the_metric_name() -> None:
    for name in ("hd95_vox_lv_cavity", "hd95", "ef_lv_mae", "challenge_avd", "challenge_hd95", "avd"):
        assert lower_is_better(name), name
    for name in ("dice", "dice_heart", "iou_lv", "f3", "challenge_lesion_f1", "recall", "ef_lv_corr"):
        assert not lower_is_better(name), name


def test_seed_average_per_case_skips_nan_and_refuses_other_cases() -> None:
    # x: (0.8 + 0.6) / 2 = 0.7; y: seed s0 has NaN, so s1's 0.5 alone; z: NaN in both -> NaN
    scores = {"s0": {"x": 0.8, "y": math.nan, "z": math.nan}, "s1": {"x": 0.6, "y": 0.5, "z": math.nan}}
    got = seed_average(scores)
    assert got["x"] == pytest.approx(0.7) and got["y"] == pytest.approx(0.5) and math.isnan(got["z"])
    with pytest.raises(InputError, match="seeds s0 and s1 were scored on different cases"):
        seed_average({"s0": {"x": 0.8}, "s1": {"w": 0.6}})
    with pytest.raises(InputError):
        seed_average({})


def test_side_spread_separates_seeds_from_cases() -> None:
    scores = {"s0": {"a": 0.8, "b": 0.6, "c": 0.7}, "s1": {"a": 0.9, "b": 0.6, "c": 0.9}}
    side = side_spread(scores, ["a", "b", "c"])
    # seed-averaged cases: a 0.85, b 0.60, c 0.80 -> mean 0.75
    # case sd: deviations +0.10, -0.15, +0.05 -> (0.01 + 0.0225 + 0.0025) / 2 = 0.0175 -> sqrt 0.132288
    # seed sd: seed means 0.7 and 0.8 -> deviations -0.05, +0.05 -> sqrt(0.005 / 1) = 0.070711
    assert side.mean == pytest.approx(0.75)
    assert side.case_sd == pytest.approx(math.sqrt(0.0175))
    assert side.seed_sd == pytest.approx(math.sqrt(0.005))
    assert side.seeds == 2
    one = side_spread({"s0": scores["s0"]}, ["a", "b", "c"])
    assert one.seed_sd is None and one.case_sd == pytest.approx(0.1)  # 0.8, 0.6, 0.7: sd 0.1


def test_wilcoxon_exact_p_by_hand() -> None:
    # |d| ranks: 0.05 -> 1, 0.1 -> 2, 0.2 -> 3, 0.3 -> 4, 0.4 -> 5; the negative one has rank 1, so
    # R- = 1. Under H0 each of the 2**5 = 32 sign patterns is equally likely; R- <= 1 in 2 of them
    # (R- = 0 and R- = 1): one-sided 2/32, two-sided p = 4/32 = 0.125.
    p, method, n = wilcoxon_test([0.1, 0.2, -0.05, 0.3, 0.4])
    assert p == pytest.approx(0.125) and method == "exact" and n == 5
    # six differences all positive: only 1 of 64 patterns has R- = 0, two-sided p = 2/64
    assert wilcoxon_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])[0] == pytest.approx(2 / 64)


def test_wilcoxon_drops_zero_differences() -> None:
    # the two zeros are dropped, leaving the six positive differences above: p = 2/64, n = 6
    p, _, n = wilcoxon_test([0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert p == pytest.approx(2 / 64) and n == 6
    assert wilcoxon_test([0.0, 0.0, 0.0]) == (1.0, "no differences", 0)


def test_wilcoxon_ties_by_enumerating_sign_patterns() -> None:
    # |d| = 0.1, 0.1, 0.2, 0.1: average ranks 2, 2, 4, 2 (sum 10); R+ = 2 + 2 + 4 = 8.
    # Over the 16 sign patterns R+ >= 8 when the 4 and at least two of the three 2s are positive:
    # 3 + 1 = 4 patterns -> 4/16; R+ <= 8 in all but the all-positive one -> 15/16.
    # Two-sided p = 2 * min(4/16, 15/16) = 0.5.
    p, method, n = wilcoxon_test([0.1, 0.1, 0.2, -0.1])
    assert p == pytest.approx(0.5) and "sign patterns" in method and n == 4
    # 0.4 - 0.3, 0.8 - 0.7 and 0.9 - 0.8 are 0.1 in the last bits (0.10000000000000003,
    # 0.10000000000000009, 0.09999999999999998): unrounded, the negative one would rank 1 alone and
    # give p = 2 * 2/8 = 0.5. Rounded they tie at rank 2 each; two positive: R+ = 4; over 8
    # patterns R+ is 0, 2, 4, 6 with 1, 3, 3, 1 patterns: P(R+ >= 4) = 4/8, P(R+ <= 4) = 7/8,
    # p = 2 * 4/8 = 1.
    p, method, _ = wilcoxon_test([0.4 - 0.3, 0.8 - 0.7, -(0.9 - 0.8)])
    assert p == pytest.approx(1.0) and "sign patterns" in method


def test_wilcoxon_normal_approximation_beyond_50_cases() -> None:
    # 60 positive, distinct differences: R+ = 60 * 61 / 2 = 1830; under H0 mean 60 * 61 / 4 = 915,
    # variance 60 * 61 * 121 / 24 = 18452.5; z = 915 / sqrt(18452.5); two-sided p = erfc(z / sqrt 2)
    p, method, n = wilcoxon_test([0.001 * (i + 1) for i in range(60)])
    z = 915 / math.sqrt(18452.5)
    assert method == "normal approximation" and n == 60
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-9)


def test_holm_step_down_on_a_known_example() -> None:
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # None (no comparison) does not count: m = 2 -> 0.02 x 2 = 0.04, 0.04 x 1 -> 0.04
    got = holm([None, 0.02, 0.04])
    assert got[0] is None and got[1:] == pytest.approx([0.04, 0.04])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 0.5 x 2 = 1.0 (capped), then at least 1.0
    assert holm([0.03]) == [0.03]
    assert holm([]) == []


def test_verdict_needs_the_test_and_the_interval_to_agree() -> None:
    assert verdict(0.02, (0.01, 0.03), 0.01, lower_better=False) == BETTER
    assert verdict(0.02, (0.01, 0.03), 0.01, lower_better=True) == WORSE  # hd95 went up
    assert verdict(-2.0, (-3.0, -1.0), 0.01, lower_better=True) == BETTER  # hd95 went down
    assert verdict(-0.02, (-0.03, -0.01), 0.01, lower_better=False) == WORSE
    assert verdict(0.02, (0.01, 0.03), 0.2, lower_better=False) == NO_DIFFERENCE  # p too large
    assert verdict(0.02, (0.01, 0.03), 0.05, lower_better=False) == NO_DIFFERENCE  # p = alpha
    assert verdict(0.02, (-0.01, 0.03), 0.01, lower_better=False) == NO_DIFFERENCE  # CI holds 0


def test_bootstrap_interval_by_hand() -> None:
    # d = [0, 1]: a resample of 2 cases has mean 0, 0.5 or 1 with chances 1/4, 1/2, 1/4. BCa's bias
    # term z0 = Phi^-1(P(mean* < 0.5) + P(mean* = 0.5) / 2) = Phi^-1(0.5) = 0; its acceleration
    # is 0 (the jackknife means 1 and 0 are symmetric about 0.5), so BCa is the percentile interval:
    # the 2.5 % quantile lies among the zeros and the 97.5 % one among the ones -> (0, 1).
    assert bootstrap_ci([0.0, 1.0]) == pytest.approx((0.0, 1.0))
    assert bootstrap_ci([0.02] * 5) == (0.02, 0.02)  # nothing to resample: the value itself
    d = [0.1, 0.2, -0.05, 0.3, 0.4]
    low, high = bootstrap_ci(d)
    assert bootstrap_ci(d) == (low, high)  # fixed seed: the same interval at every rebuild
    assert -0.05 <= low < 0.19 < high <= 0.4  # around the mean 0.19, inside the data's range
    with pytest.raises(InputError, match="at least 2 cases"):
        bootstrap_ci([0.1])


def _one_seed(values: dict[str, float]) -> dict[str, dict[str, float]]:
    return {"0": values}


def test_paired_comparison_end_to_end() -> None:
    b = {"c1": 0.8, "c2": 0.75, "c3": 0.68, "c4": 0.56, "c5": 0.82, "c6": 0.69}
    d = {"c1": 0.10, "c2": 0.05, "c3": 0.02, "c4": 0.04, "c5": 0.03, "c6": 0.06}
    a = {c: b[c] + d[c] for c in b}
    a["only_a"], b["only_b"] = 0.5, 0.5
    a["empty"], b["empty"] = math.nan, 0.9  # no value in A: left out
    result = paired(_one_seed(a), _one_seed(b), "dice")
    # d: mean 0.30 / 6 = 0.05, median (0.04 + 0.05) / 2 = 0.045; six positive -> p = 2/64
    assert result.cases == ["c1", "c2", "c3", "c4", "c5", "c6"]
    assert result.mean_difference == pytest.approx(0.05)
    assert result.median_difference == pytest.approx(0.045)
    assert result.p_value == pytest.approx(2 / 64) and result.p_holm == result.p_value
    # every resample mean lies between the smallest and largest difference, 0.02 and 0.10
    assert 0.02 <= result.ci[0] < 0.05 < result.ci[1] <= 0.10
    assert result.verdict == BETTER and result.note == ""
    assert result.a.mean == pytest.approx(result.b.mean + 0.05)
    assert result.left_out == {"only_a": ["only_a"], "only_b": ["only_b"], "nan": ["empty"]}
    assert paired(_one_seed(a), _one_seed(b), "hd95").verdict == WORSE  # the same rise of a distance
    assert paired(_one_seed(a), _one_seed(b), "dice", lower_better=True).verdict == WORSE


def test_paired_says_when_too_few_cases_differ_and_refuses_under_two() -> None:
    a = {f"c{i}": 0.9 for i in range(5)}
    b = {f"c{i}": 0.8 for i in range(5)}
    result = paired(_one_seed(a), _one_seed(b), "dice")
    # five positive differences: the smallest two-sided p is 2 / 2**5 = 0.0625 >= 0.05
    assert result.p_value == pytest.approx(0.0625) and result.verdict == NO_DIFFERENCE
    assert "smallest possible p 0.0625" in result.note
    with pytest.raises(InputError, match="1 case"):
        paired(_one_seed({"x": 0.9, "y": math.nan}), _one_seed({"x": 0.8, "y": 0.7}), "dice")


def test_holm_adjust_recomputes_the_verdicts() -> None:
    base = {f"c{i}": 0.5 + 0.01 * i for i in range(6)}
    up = {c: v + 0.01 * (i + 1) for i, (c, v) in enumerate(base.items())}
    first = paired(_one_seed(up), _one_seed(base), "dice")
    assert first.verdict == BETTER and first.p_value == pytest.approx(2 / 64)
    # two comparisons with p = 2/64 each: Holm gives 2 x 2/64 = 0.0625 to both -> no longer below 0.05
    adjusted = holm_adjust([first, first])
    assert [c.p_holm for c in adjusted] == pytest.approx([0.0625, 0.0625])
    assert [c.verdict for c in adjusted] == [NO_DIFFERENCE, NO_DIFFERENCE]
    assert adjusted[0].p_value == first.p_value
