"""turnrl.compute_advantages and broadcast_to_tokens against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import turnrl
from turnrl.exceptions import InvalidInputError, UnknownNameError

from reference import reference_advantages, reference_broadcast

ESTIMATORS = ["grpo", "mt_grpo", "gtpo_hybrid"]
NORMS = ["std", "mean", "none", "rloo", "batch"]
REWARD_LEVELS = [-1.0, -0.1, 0.0, 0.1, 0.3, 1.0]


@st.composite
def ragged_batches(draw):
    """Ragged batches: 0-64 turns per trajectory, groups of 1-16, ties,
    all-zero rewards, mixed turn counts, group ids shuffled."""
    n_groups = draw(st.integers(1, 6))
    sizes = [draw(st.integers(1, 16)) for _ in range(n_groups)]
    ids = draw(
        st.lists(st.integers(-(2**40), 2**40), min_size=n_groups, max_size=n_groups, unique=True)
    )
    group = np.repeat(np.array(ids, dtype=np.int64), sizes)
    order = draw(st.permutations(range(len(group))))
    group = group[list(order)]
    b = len(group)
    max_turns = draw(st.sampled_from([0, 1, 3, 10, 64]))
    counts = draw(st.lists(st.integers(0, max_turns), min_size=b, max_size=b))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    kind = draw(st.sampled_from(["levels", "zeros", "floats"]))
    total = int(offsets[-1])
    if kind == "zeros":
        rewards = np.zeros(total)
    elif kind == "levels":
        rewards = np.array(
            draw(st.lists(st.sampled_from(REWARD_LEVELS), min_size=total, max_size=total)),
            dtype=np.float64,
        )
    else:
        rewards = np.array(
            draw(st.lists(st.floats(-5, 5), min_size=total, max_size=total)), dtype=np.float64
        )
    outcome = np.array(
        draw(st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=b, max_size=b)), dtype=np.float64
    )
    return outcome, group, rewards, offsets


params_strategy = st.fixed_dictionaries(
    {},
    optional={
        "norm": st.sampled_from(NORMS),
        "eps": st.sampled_from([1e-6, 1e-4, 0.1]),
        "gamma": st.sampled_from([0.0, 0.5, 0.9, 1.0]),
        "lam": st.sampled_from([0.0, 0.3, 1.0, -0.5]),
        "turn_norm": st.sampled_from(["position", "pooled"]),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=ragged_batches(), estimator=st.sampled_from(ESTIMATORS), params=params_strategy)
def test_matches_numpy_reference(batch, estimator, params):
    outcome, group, rewards, offsets = batch
    got = turnrl.compute_advantages(estimator, outcome, group, rewards, offsets, **params)
    want = reference_advantages(estimator, outcome, group, rewards, offsets, **params)
    assert got.dtype == np.float64 and got.shape == rewards.shape
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=ragged_batches(),
    estimator=st.sampled_from(ESTIMATORS),
    params=params_strategy,
    exponent=st.sampled_from([-320, -300, -170, -160]),
)
def test_eps_zero_is_finite_when_squares_underflow(batch, estimator, params, exponent):
    """eps = 0 and values so small that their squared deviations underflow:
    the std is 0, and dividing by it gave inf and NaN. Such a set normalises to
    0, as a set of equal values does."""
    outcome, group, rewards, offsets = batch
    scale = 10.0**exponent
    outcome, rewards = outcome * scale, rewards * scale
    params = {**params, "eps": 0.0}
    got = turnrl.compute_advantages(estimator, outcome, group, rewards, offsets, **params)
    assert np.all(np.isfinite(got))
    if exponent <= -170:  # every square underflows: no rounding left to differ in
        want = reference_advantages(estimator, outcome, group, rewards, offsets, **params)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("turn_norm", ["position", "pooled"])
def test_eps_zero_with_distinct_tiny_values_gives_zero(estimator, turn_norm):
    tiny = np.array([0.0, 1e-170, 2e-170])
    offsets = np.arange(4)
    for outcome, rewards in ((tiny, np.zeros(3)), (np.ones(3), tiny)):
        got = turnrl.compute_advantages(
            estimator, outcome, [0, 0, 0], rewards, offsets, eps=0.0, turn_norm=turn_norm
        )
        assert np.array_equal(got, np.zeros(3)), got


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_lam_too_large_to_stay_finite_is_refused(estimator):
    outcome, group, offsets = [1.0, 0, 0, 0, 0, 0], [0] * 6, np.arange(7)
    for lam in (1e101, 1e308, -1e308):
        with pytest.raises(InvalidInputError, match=r"lam must be at most 1e100 in size"):
            turnrl.compute_advantages(estimator, outcome, group, np.zeros(6), offsets, lam=lam)
    for lam in (1e100, -1e100):
        for norm in NORMS:
            got = turnrl.compute_advantages(
                estimator,
                outcome,
                group,
                [1e100, -1e100, 0, 0, 0, 1e100],
                offsets,
                lam=lam,
                norm=norm,
            )
            assert np.all(np.isfinite(got))


def test_parallel_path_matches_reference():
    # Above the core's parallel threshold (32k turns), groups out of order.
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 41, size=2400)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    group = rng.permutation(np.arange(2400) // 8)
    outcome = rng.integers(0, 2, size=2400).astype(float)
    rewards = rng.choice(REWARD_LEVELS, size=offsets[-1])
    assert offsets[-1] > 40_000
    for estimator in ESTIMATORS:
        got = turnrl.compute_advantages(estimator, outcome, group, rewards, offsets)
        want = reference_advantages(estimator, outcome, group, rewards, offsets)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("turn_norm", ["position", "pooled"])
def test_batch_norm_parallel_path_matches_reference(turn_norm):
    """norm="batch" gathers the batch's statistics in a first pass, in
    parallel above 32k turns; its result is the serial definition's."""
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 41, size=2400)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    group = rng.permutation(np.arange(2400) // 6)
    outcome = rng.choice([0.0, 0.5, 1.0], size=2400)
    rewards = rng.choice(REWARD_LEVELS, size=offsets[-1])
    assert offsets[-1] > 40_000
    params = {"norm": "batch", "turn_norm": turn_norm}
    for estimator in ESTIMATORS:
        got = turnrl.compute_advantages(estimator, outcome, group, rewards, offsets, **params)
        want = reference_advantages(estimator, outcome, group, rewards, offsets, **params)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", [n for n in NORMS if n != "none"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_single_member_and_constant_groups_give_exact_zero(estimator, norm):
    outcome = [1.0, 0.7, 0.7, 0.7]
    group = [5, 9, 9, 9]
    rewards = [0.3, 0.3, 0.1, 0.3, 0.1, 0.3, 0.1]
    offsets = [0, 1, 3, 5, 7]
    got = turnrl.compute_advantages(estimator, outcome, group, rewards, offsets, norm=norm)
    assert np.array_equal(got, np.zeros(7))


def test_rloo_is_leave_one_out_and_batch_scales_by_the_batch_std():
    outcome = np.array([1.0, 0.0, 0.0, 10.0, 0.0])
    group = [3, 3, 3, 1, 1]
    offsets = np.arange(6)
    rloo = turnrl.compute_advantages("grpo", outcome, group, np.zeros(5), offsets, norm="rloo")
    np.testing.assert_allclose(rloo, [1.0, -0.5, -0.5, 10.0, -10.0])
    batch = turnrl.compute_advantages(
        "grpo", outcome, group, np.zeros(5), offsets, norm="batch", eps=0.0
    )
    std = outcome.std(ddof=1)  # of the raw outcomes of both groups
    np.testing.assert_allclose(batch, np.array([2 / 3, -1 / 3, -1 / 3, 5, -5]) / std)


def test_hybrid_rewards_a_read_inside_a_success():
    # The paper's motivating case: the same +0.3 read-only turn, once in a
    # success and once in a failure; the hybrid ranks them by outcome.
    adv = turnrl.compute_advantages("gtpo_hybrid", [1.0, 0.0], [0, 0], [0.3, 0.3], [0, 1, 2])
    assert adv[0] > 0 > adv[1]


def test_accepts_lists_strided_and_int_arrays():
    rewards = np.array([0.1, 9.0, 0.3, 9.0, 0.0, 9.0])[::2]
    got = turnrl.compute_advantages(
        "mt_grpo", [1, 0], np.array([3, 3], dtype=np.int32), rewards, [0, 2, 3]
    )
    want = reference_advantages("mt_grpo", [1, 0], [3, 3], [0.1, 0.3, 0.0], [0, 2, 3])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_empty_batch():
    got = turnrl.compute_advantages("gtpo_hybrid", [], [], [], [0])
    assert got.shape == (0,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([1.0, 0.0], [0], [0.0], [0, 1, 1]), "group has length 1 but outcome has length 2"),
        (([1.0, 0.0], [0, 0], [0.0], [0, 1]), "turn_offsets has length 2"),
        (([1.0, 0.0], [0, 0], [0.0, 0.0], [1, 1, 2]), "turn_offsets[0] must be 0"),
        (([1.0, 0.0, 1.0], [0, 0, 0], [0.0] * 3, [0, 2, 1, 3]), "not monotone at trajectory 1"),
        (([1.0, 0.0], [0, 0], [0.0] * 3, [0, 1, 2]), "len(turn_rewards) = 3"),
        (([1.0, np.inf], [0, 0], [0.0], [0, 1, 1]), "outcome[1] is inf (trajectory 1)"),
        (
            ([1.0, 0.0, 1.0], [0, 0, 0], [0.0, 0.0, np.nan], [0, 1, 1, 3]),
            "turn_rewards[2] is NaN (trajectory 2, turn 1)",
        ),
        (([1.0], [0.5], [0.0], [0, 1]), "group must hold integers"),
        (([[1.0]], [0], [0.0], [0, 1]), "outcome must be one-dimensional"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_row(args, message):
    with pytest.raises(InvalidInputError) as info:
        turnrl.compute_advantages("gtpo_hybrid", *args)
    assert isinstance(info.value, ValueError)
    assert message in str(info.value)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownNameError, match="gtpo_hybrid"):
        turnrl.compute_advantages("ppo", [1.0], [0], [0.0], [0, 1])
    with pytest.raises(ValueError, match="expected one of: std, mean, none, rloo, batch"):
        turnrl.compute_advantages("grpo", [1.0], [0], [0.0], [0, 1], norm="z")
    with pytest.raises(ValueError, match="position, pooled"):
        turnrl.compute_advantages("grpo", [1.0], [0], [0.0], [0, 1], turn_norm="x")
    with pytest.raises(ValueError, match="eps must be finite"):
        turnrl.compute_advantages("grpo", [1.0], [0], [0.0], [0, 1], eps=-1.0)
    with pytest.raises(TypeError):
        turnrl.compute_advantages("grpo", [1.0], [0], [0.0], [0, 1], gama=0.5)


def test_registry_takes_a_python_estimator():
    @turnrl.register_estimator("test_outcome_only")
    def outcome_only(batch: turnrl.AdvantageBatch, **params):
        return np.repeat(batch.outcome, batch.turn_counts)

    got = turnrl.compute_advantages("test_outcome_only", [1.0, 0.0], [0, 0], [0.1] * 3, [0, 2, 3])
    assert got.tolist() == [1.0, 1.0, 0.0]
    assert "test_outcome_only" in turnrl.estimator_names()
    # Registered estimators get validated input too.
    with pytest.raises(InvalidInputError, match="not monotone"):
        turnrl.compute_advantages("test_outcome_only", [1.0, 0.0], [0, 0], [0.1], [0, 2, 1])
    with pytest.raises(ValueError, match="already registered"):
        turnrl.register_estimator("gtpo_hybrid")(outcome_only)


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_broadcast_matches_reference(data):
    counts = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=8))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    turn_adv = np.arange(offsets[-1], dtype=np.float64) + 0.5
    width = data.draw(st.integers(0, 20))
    token_turn = np.array(
        [[data.draw(st.integers(-1, c - 1)) for _ in range(width)] for c in counts],
        dtype=np.int64,
    ).reshape(len(counts), width)
    got = turnrl.broadcast_to_tokens(turn_adv, offsets, token_turn)
    np.testing.assert_array_equal(got, reference_broadcast(turn_adv, offsets, token_turn))


def test_broadcast_rejects_turns_out_of_range():
    with pytest.raises(InvalidInputError, match=r"token_turn\[1, 2\] = 1 but trajectory 1 has 1"):
        turnrl.broadcast_to_tokens([0.5, 0.2, 0.1], [0, 2, 3], [[0, 1, -1], [-1, 0, 1]])
    with pytest.raises(InvalidInputError, match="use -1"):
        turnrl.broadcast_to_tokens([0.5], [0, 1], [[-2]])
    with pytest.raises(InvalidInputError, match="2 trajectories"):
        turnrl.broadcast_to_tokens([0.5, 0.2, 0.1], [0, 2, 3], [[0, 1, -1]])


@pytest.mark.parametrize("shape", [(5, 6), (5, 0), (1, 0), (0, 0)])
def test_broadcast_rejects_a_grid_with_the_wrong_rows_whatever_its_width(shape):
    # Two trajectories: the row count is checked even when the grid has no
    # columns (a (5, 0) grid was accepted and came back as (5, 0)).
    with pytest.raises(InvalidInputError, match=f"{shape[0]} rows but .* 2 trajectories"):
        turnrl.broadcast_to_tokens([1.0, 2.0, 3.0, 4.0], [0, 3, 4], np.zeros(shape, np.int64))
    assert turnrl.broadcast_to_tokens([1.0, 2.0, 3.0, 4.0], [0, 3, 4], np.zeros((2, 0))).shape == (
        2,
        0,
    )
