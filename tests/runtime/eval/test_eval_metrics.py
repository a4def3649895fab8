"""mean@n, unbiased pass@k and maj@n on a fixed set of samples, against values computed by hand."""

from __future__ import annotations

import math
from itertools import combinations

import pytest

from runtime.eval.metrics import dataset_metrics, ks_for, majority, pass_at_k
from runtime.eval.samples import Sample


def _s(problem: int, k: int, answer: str | None, truth: str, *, tools: int = 0, tokens: int = 10, cut: bool = False) -> Sample:
    return Sample(
        dataset="aime", problem=problem, sample=k, response=f"\\boxed{{{answer}}}", answer=answer,
        ground_truth=truth, correct=answer == truth, score=1.0 if answer == truth else -1.0,
        tool_calls=tools, response_tokens=tokens, truncated=cut,
    )


# Three problems, four samples each.
#   p0: answers 7 3 7 5, truth 7 -> c=2; majority 7 (2 votes) -> right
#   p1: answers 1 1 - 9, truth 9 -> c=1; majority 1 (2 votes; no answer does not vote) -> wrong
#   p2: answers 2 4 4 2, truth 4 -> c=2; tie 2:2, the answer seen first (2) wins -> wrong
SAMPLES = [
    _s(0, 0, "7", "7", tools=1), _s(0, 1, "3", "7", tools=2), _s(0, 2, "7", "7"), _s(0, 3, "5", "7", tokens=30, cut=True),
    _s(1, 0, "1", "9"), _s(1, 1, "1", "9"), _s(1, 2, None, "9", tokens=30, cut=True), _s(1, 3, "9", "9", tools=3),
    _s(2, 0, "2", "4"), _s(2, 1, "4", "4"), _s(2, 2, "4", "4"), _s(2, 3, "2", "4"),
]


def test_metrics_match_hand_computed_values() -> None:
    m = dataset_metrics("aime", SAMPLES, 4)
    # mean@4 = (2/4 + 1/4 + 2/4) / 3
    assert m.mean_at_n == pytest.approx(1.25 / 3)
    # pass@1 = mean@4; pass@2 = 1 - C(n-c,2)/C(4,2): p0 1-1/6, p1 1-3/6, p2 1-1/6; pass@4 = 1 everywhere
    assert m.pass_at_k == pytest.approx({"1": 1.25 / 3, "2": (5 / 6 + 1 / 2 + 5 / 6) / 3, "4": 1.0})
    assert m.maj_at_n == pytest.approx(1 / 3)
    assert m.mean_tool_calls == pytest.approx(6 / 12)
    assert m.mean_response_tokens == pytest.approx((10 * 10 + 30 * 2) / 12)
    assert m.truncated_share == pytest.approx(2 / 12)
    assert (m.problems, m.samples_per_problem) == (3, 4)


def test_only_the_first_n_samples_count() -> None:
    m = dataset_metrics("aime", SAMPLES, 2)
    # p0: 7 3 -> c=1 (tie, 7 first -> maj right); p1: 1 1 -> c=0; p2: 2 4 -> c=1 (tie, 2 first -> maj wrong)
    assert m.mean_at_n == pytest.approx((0.5 + 0 + 0.5) / 3)
    assert m.pass_at_k == pytest.approx({"1": 1 / 3, "2": 2 / 3})
    assert m.maj_at_n == pytest.approx(1 / 3)


def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_correct_sample() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(range(n), k))
                exact = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_ks_and_majority() -> None:
    assert ks_for(1) == [1]
    assert ks_for(30) == [1, 2, 4, 8, 16]
    assert ks_for(32) == [1, 2, 4, 8, 16, 32]
    assert majority([None, "", None]) is None
    assert majority(["3", "5", "5", "3"]) == "3"
    assert majority([None, "5", "3", "3"]) == "3"


def test_a_problem_short_of_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="do not have 4 samples"):
        dataset_metrics("aime", SAMPLES[:-1], 4)


def test_metric_names() -> None:
    m = dataset_metrics("aime", SAMPLES, 4)
    assert m.metric("mean@n") == m.metric("mean@4") == m.mean_at_n
    assert m.metric("pass@2") == m.pass_at_k["2"]
    assert m.metric("maj@4") == m.maj_at_n
    assert m.metric("pass@3") is None and m.metric("mean@8") is None
