"""pass@k against exact combinatorics and against brute-force enumeration of k-subsets."""

from __future__ import annotations

import itertools
from fractions import Fraction
from math import comb

import pytest

from loopcoder_jax.evaluate.passk import mean_pass_at_k, pass_at_k, reportable_ks


def _exact(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 200])
def test_matches_exact_binomial_formula(n):
    for c in range(n + 1):
        for k in {1, 2, 5, 10, 100, n} & set(range(1, n + 1)):
            assert pass_at_k(n, c, k) == pytest.approx(float(_exact(n, c, k)), abs=1e-12)


def test_matches_enumerating_every_k_subset():
    n = 7
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            want = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_known_values_and_mean():
    assert pass_at_k(1, 0, 1) == 0.0 and pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction passing
    assert pass_at_k(10, 1, 10) == 1.0
    assert pass_at_k(10, 0, 10) == 0.0
    # one problem with 2/4 at pass@2 = 1 - C(2,2)/C(4,2) = 5/6, one with 0/4
    assert mean_pass_at_k([(4, 2), (4, 0)], 2) == pytest.approx(5 / 12)
    assert reportable_ks(1) == [1] and reportable_ks(10) == [1, 10] and reportable_ks(9) == [1]


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)])
def test_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
