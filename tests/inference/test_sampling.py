"""The samplers are pure functions: check each filter and the sampled distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopcoder_jax.generate import (
    INSTRUCT_SAMPLING,
    GenerationError,
    Sampling,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)

LOGITS = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15], [0.6, 0.1, 0.1, 0.1, 0.1]]))


def test_top_k_keeps_exactly_the_k_largest():
    out = np.asarray(top_k_filter(LOGITS, 2))
    assert np.isfinite(out[0]).tolist() == [False, True, False, True, False]
    np.testing.assert_array_equal(out[0, [1, 3]], np.asarray(LOGITS)[0, [1, 3]])
    assert np.isfinite(np.asarray(top_k_filter(LOGITS, 99))).all()  # k > V keeps everything


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # Row 0 sorted: 0.4, 0.3, 0.15, 0.1, 0.05. p=0.7 is reached by {0.4, 0.3}; p=0.71 needs 0.15.
    keep = lambda p: np.isfinite(np.asarray(top_p_filter(LOGITS, p)))[0].tolist()
    assert keep(0.65) == [False, True, False, True, False]
    assert keep(0.71) == [False, True, False, True, True]
    assert keep(1e-6) == [False, True, False, False, False]  # the top token always stays
    assert all(keep(1.0))
    # Row 1: the top token alone (0.6) reaches p = 0.5.
    assert np.isfinite(np.asarray(top_p_filter(LOGITS, 0.5)))[1].tolist() == [True] + [False] * 4


def test_greedy_is_argmax_and_ignores_keys():
    keys = jax.random.split(jax.random.key(0), 2)
    assert sample_tokens(keys, LOGITS, Sampling()).tolist() == [1, 0]


def _empirical(sampling: Sampling, n: int = 20000) -> np.ndarray:
    logits = jnp.broadcast_to(LOGITS[0], (n, 5))
    keys = jax.random.split(jax.random.key(3), n)
    tokens = np.asarray(jax.jit(sample_tokens, static_argnums=2)(keys, logits, sampling))
    return np.bincount(tokens, minlength=5) / n


@pytest.mark.parametrize(
    "sampling, expected",
    [
        # T=1, no filter: the softmax itself.
        (Sampling(1.0), [0.05, 0.4, 0.1, 0.3, 0.15]),
        # T=0.5 squares the probabilities before renormalising.
        (Sampling(0.5), np.square([0.05, 0.4, 0.1, 0.3, 0.15])),
        # top-k 2 then renormalise: 0.4 / 0.7 and 0.3 / 0.7 (exercises the top-k fast path).
        (Sampling(1.0, top_k=2), [0, 0.4, 0, 0.3, 0]),
        # top-p 0.71 -> {0.4, 0.3, 0.15} (full-vocabulary sort path).
        (Sampling(1.0, top_p=0.71), [0, 0.4, 0, 0.3, 0.15]),
        # top-k 3 and top-p 0.65 -> {0.4, 0.3}: the nucleus is taken among the k survivors.
        (Sampling(1.0, top_k=3, top_p=0.65), [0, 0.4, 0, 0.3, 0]),
    ],
)
def test_sampled_frequencies_match_the_filtered_distribution(sampling, expected):
    expected = np.asarray(expected, np.float64)
    expected = expected / expected.sum()
    freq = _empirical(sampling)
    # 20k draws: the standard error of each frequency is <= 0.0036; 0.015 is > 4 sigma.
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_per_row_keys_make_rows_independent_of_batch_neighbours():
    keys = jax.random.split(jax.random.key(7), 4)
    logits = jax.random.normal(jax.random.key(1), (4, 50))
    sample = jax.jit(sample_tokens, static_argnums=2)
    batched = sample(keys, logits, INSTRUCT_SAMPLING)
    single = [
        int(sample(keys[i : i + 1], logits[i : i + 1], INSTRUCT_SAMPLING)[0]) for i in range(4)
    ]
    assert batched.tolist() == single


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_values_are_rejected(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        Sampling(**kwargs)


def test_instruct_defaults_are_the_model_card_values():
    assert (INSTRUCT_SAMPLING.temperature, INSTRUCT_SAMPLING.top_k, INSTRUCT_SAMPLING.top_p) == (
        0.6,
        20,
        0.85,
    )
