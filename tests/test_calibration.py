"""Iterative Reward Calibration: statistics against scipy, exact sharding,
planted tiers, the loop, tier files and the online calibrator."""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rollout_cases import labelled_records

import turnrl
from turnrl.calibration import (
    DEFAULT_TIERS,
    PRESETS,
    OnlineCalibrator,
    TieredRollouts,
    TierStats,
    calibrate,
    direction_check,
    load_tier_rewards,
    rewards_from_correlations,
    save_tier_rewards,
)
from turnrl.exceptions import InvalidInputError

scipy_stats = pytest.importorskip("scipy.stats")


@st.composite
def tiered_batches(draw, max_traj=60):
    b = draw(st.integers(0, max_traj))
    counts = draw(st.lists(st.integers(0, 12), min_size=b, max_size=b))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = int(offsets[-1])
    tiers = np.array(draw(st.lists(st.integers(-1, 5), min_size=n, max_size=n)), dtype=np.int64)
    outcome = np.array(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=b, max_size=b)))
    group = np.arange(b) // 4
    return TieredRollouts(outcome, group, offsets, tiers)


def reference_sums(rollouts: TieredRollouts):
    """Per-trajectory presence and count of each tier, plain loops."""
    b = len(rollouts.outcome)
    counts = np.zeros((b, len(rollouts.tiers)), dtype=np.int64)
    for i in range(b):
        for j in range(rollouts.turn_offsets[i], rollouts.turn_offsets[i + 1]):
            if rollouts.turn_tiers[j] >= 0:
                counts[i, rollouts.turn_tiers[j]] += 1
    return counts, (rollouts.outcome >= 1.0).astype(np.int64)


@settings(max_examples=150, deadline=None)
@given(rollouts=tiered_batches())
def test_correlations_equal_scipy_pointbiserialr(rollouts):
    counts, success = reference_sums(rollouts)
    stats = TierStats.from_rollouts(rollouts)
    assert stats.trajectories == len(success) and stats.successes == success.sum()
    np.testing.assert_array_equal(stats.present, (counts > 0).sum(axis=0))
    np.testing.assert_array_equal(stats.turns_sq, (counts**2).sum(axis=0))
    for variable, x_all in (("presence", counts > 0), ("count", counts)):
        for t, c in enumerate(stats.correlations(variable=variable)):
            x = x_all[:, t].astype(float)
            if len(x) < 2 or np.all(x == x[0]) or np.all(success == success[0]):
                # scipy gives NaN for a constant variable; we give "no relation"
                # and an interval that rules nothing out.
                assert (c.r, c.p_value, c.ci_low, c.ci_high) == (0.0, 1.0, -1.0, 1.0)
                continue
            want = scipy_stats.pointbiserialr(x, success)
            assert c.r == pytest.approx(want.statistic, abs=1e-12)
            if len(x) == 2:
                assert c.p_value == 1.0
            elif abs(want.statistic) < 1 - 1e-9:
                assert c.p_value == pytest.approx(want.pvalue, rel=1e-7, abs=1e-13)
            if len(x) > 3 and abs(c.r) < 1:
                half = scipy_stats.norm.ppf(0.975) / math.sqrt(len(x) - 3)
                assert c.ci_low == pytest.approx(math.tanh(math.atanh(c.r) - half), abs=1e-9)
                assert c.ci_high == pytest.approx(math.tanh(math.atanh(c.r) + half), abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(rollouts=tiered_batches(), cut=st.floats(0, 1))
def test_sharded_statistics_equal_one_pass_exactly(rollouts, cut):
    b = len(rollouts.outcome)
    k = int(cut * b)
    o = rollouts.turn_offsets

    def part(lo, hi):
        return TieredRollouts(
            rollouts.outcome[lo:hi],
            rollouts.group[lo:hi],
            o[lo : hi + 1] - o[lo],
            rollouts.turn_tiers[o[lo] : o[hi]],
        )

    merged = TierStats.from_rollouts(part(0, k)) + TierStats.from_rollouts(part(k, b))
    whole = TierStats.from_rollouts(rollouts)
    assert merged == whole
    assert merged.correlations() == whole.correlations()


def planted(seed=0, tasks=200, group_size=8):
    """Tier 'good' predicts success, 'bad' predicts failure, 'noise' neither."""
    rng = np.random.default_rng(seed)
    b = tasks * group_size
    outcome = (rng.uniform(size=b) < 0.5).astype(float)
    tiers = ("good", "bad", "noise", "respond")
    turn_tiers, offsets = [], [0]
    for i in range(b):
        k = rng.integers(2, 8)
        codes = rng.choice([2, 3], size=k)  # noise and respond everywhere
        if outcome[i] == 1.0 and rng.uniform() < 0.9:
            codes[rng.integers(k)] = 0
        if outcome[i] == 0.0 and rng.uniform() < 0.9:
            codes[rng.integers(k)] = 1
        turn_tiers.extend(codes)
        offsets.append(len(turn_tiers))
    group = np.arange(b) // group_size
    return TieredRollouts(outcome, group, np.array(offsets), np.array(turn_tiers), tiers)


@pytest.mark.parametrize("estimator", ["gtpo_hybrid", "mt_grpo"])
def test_planted_tiers_calibrate_to_the_right_signs(estimator):
    rollouts = planted()
    start = {"good": 0.3, "bad": 0.3, "noise": 0.3, "respond": 0.0}
    report = calibrate(rollouts, start, estimator=estimator)
    r = {c.tier: c.r for c in report.correlations}
    assert r["good"] > 0.5 and r["bad"] < -0.5
    assert report.rewards["good"] > 0 > report.rewards["bad"]
    assert report.rewards["noise"] == 0.0
    assert (
        max(abs(v) for v in report.rewards.values()) == pytest.approx(1.0) or report.best.index > 1
    )
    assert report.converged
    assert report.best.misaligned == 0
    # The naive start credits 'bad' turns positively: misaligned before, not after.
    assert report.initial.misaligned > 0


def test_numpy_numbers_are_numbers():
    rollouts = planted()
    want = calibrate(rollouts, "naive").rewards
    got = calibrate(
        rollouts,
        "naive",
        target=np.float32(1.0),
        alpha=np.float64(0.05),
        min_abs_r=np.float32(0.1),
        success_threshold=np.int64(1),
    ).rewards
    assert got == pytest.approx(want)
    with pytest.raises(InvalidInputError, match="target must be a finite number > 0"):
        calibrate(rollouts, "naive", target=np.float32("nan"))


def test_rewards_proportional_to_r_and_zero_when_not_significant():
    stats = TierStats.from_rollouts(planted(seed=3))
    correlations = stats.correlations()
    rewards = rewards_from_correlations(correlations, target=2.0)
    by_tier = {c.tier: c for c in correlations}
    assert max(abs(v) for v in rewards.values()) == pytest.approx(2.0)
    ratio = rewards["good"] / rewards["bad"]
    assert ratio == pytest.approx(by_tier["good"].r / by_tier["bad"].r)
    strict = rewards_from_correlations(correlations, min_abs_r=0.99)
    assert all(v == 0.0 for v in strict.values())


def _hybrid_advantages(rollouts, rewards):
    """The GTPO hybrid's turn advantages of ``rollouts`` under ``rewards``, as
    direction_check computes them."""
    return turnrl.compute_advantages(
        "gtpo_hybrid",
        rollouts.outcome,
        rollouts.group,
        rollouts.turn_rewards(rewards),
        rollouts.turn_offsets,
    )


def test_direction_check_counts_match_a_plain_loop():
    rollouts = planted(seed=5, tasks=20)
    rewards = {"good": 1.0, "bad": -0.5, "noise": 0.2, "respond": 0.0}
    correlations = TierStats.from_rollouts(rollouts).correlations()
    got = {d.tier: d for d in direction_check(rollouts, rewards, correlations)}
    adv = _hybrid_advantages(rollouts, rewards)
    for c in correlations:
        t = rollouts.tiers.index(c.tier)
        on = rollouts.turn_tiers == t
        sign = 0 if rewards[c.tier] == 0 else np.sign(c.r)
        assert got[c.tier].turns == on.sum()
        assert got[c.tier].misaligned == np.sum(sign * adv[on] < 0)
        assert got[c.tier].mean_advantage == pytest.approx(adv[on].mean())


def zero_mean_read_groups(order) -> TieredRollouts:
    """Ten groups in which every member makes one read call, with outcomes in
    ``order``, and ten failed groups of write calls. Under mt_grpo the read
    turns' mean advantage is 0 in exact arithmetic whatever the read reward:
    the turn term is constant within each group and the outcome term sums to
    0 over it."""
    outcome, group, codes = [], [], []
    for g in range(10):
        outcome += order
        group += [g] * len(order)
        codes += [2] * len(order)  # read
    for g in range(10, 20):
        outcome += [0.0, 0.0, 0.1]
        group += [g] * 3
        codes += [3] * 3  # write
    offsets = np.arange(len(codes) + 1)
    return TieredRollouts(np.array(outcome), np.array(group), offsets, np.array(codes))


def test_a_zero_mean_advantage_is_zero_whatever_the_member_order():
    """The mean came out as -1e-16 or +7e-17 depending on the order of a
    group's members, so the same data was aligned or not, and calibrated to
    read = 1.5 or read = 0."""
    reports = [
        calibrate(zero_mean_read_groups(order), "naive", estimator="mt_grpo", success_threshold=0.3)
        for order in (
            [0.0, 0.2, 0.1, 0.5, 0.3],
            [0.0, 0.2, 0.5, 0.1, 0.3],
            [0.3, 0.5, 0.2, 0.1, 0.0],
        )
    ]
    assert all(report.to_dict() == reports[0].to_dict() for report in reports)
    report = reports[0]
    for it in [report.initial, *report.iterations]:
        read = next(d for d in it.directions if d.tier == "read")
        assert read.mean_advantage == 0.0 and read.turns == 50
        # 0 is not r's sign: not aligned while read has a reward.
        assert read.aligned == (read.reward == 0.0)
    # Boosted to the cap (2 x target, tried itself) and, still not aligned
    # there, dropped: its reward does not move its turns at all.
    assert [it.rewards["read"] for it in report.iterations] == [1.0, 1.5, 2.0, 0.0]
    assert report.converged and report.best.index == 4 and report.rewards["read"] == 0.0


def aligned_only_above(mixed=22, clean=8, flip=False) -> TieredRollouts:
    """Read turns whose mean mt_grpo advantage (norm="mean") has r's sign only
    when |read reward| > (mixed - clean) / clean.

    ``mixed`` groups: [read, read] fails, [read] succeeds (position 0 is read
    in both, so its turn term is 0; position 1 is alone, so 0 too); outcome
    terms -1/2, -1/2 and +1/2. ``clean`` groups: [read] succeeds, [no tier]
    fails; outcome +1/2, turn term w/2. The read turns' advantages sum to
    (clean - mixed + clean * w) / 2. ``flip`` swaps success and failure:
    r < 0, and everything changes sign."""
    outcome, group, offsets, codes = [], [], [0], []
    members = [([2, 2], 0.0), ([2], 1.0)] * mixed + [([2], 1.0), ([-1], 0.0)] * clean
    for i, (turns, result) in enumerate(members):
        outcome.append(1.0 - result if flip else result)
        group.append(i // 2)
        codes += turns
        offsets.append(len(codes))
    return TieredRollouts(np.array(outcome), np.array(group), np.array(offsets), np.array(codes))


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(
    ("boost", "max_reward", "magnitudes"),
    [
        # Aligned above 1.75: 1.5 is not, 2.25 passed the cap of 2 and the
        # tier was dropped; the cap itself is tried.
        (1.5, None, [1.0, 1.5, 2.0]),
        # One boost overshoots the cap: clamped to it, not dropped.
        (3.0, 2.5, [1.0, 2.5]),
        # Overshooting by a hair is clamped too.
        (2.0, 2.0 - 1e-12, [1.0, 2.0 - 1e-12]),
    ],
)
def test_a_tier_aligned_only_at_the_cap_is_tried_there(flip, boost, max_reward, magnitudes):
    report = calibrate(
        aligned_only_above(flip=flip),
        "naive",
        estimator="mt_grpo",
        norm="mean",
        boost=boost,
        max_reward=max_reward,
    )
    sign = -1.0 if flip else 1.0
    assert [it.rewards["read"] for it in report.iterations] == [sign * m for m in magnitudes]
    read = [next(d for d in it.directions if d.tier == "read") for it in report.iterations]
    assert [d.aligned for d in read] == [False] * (len(magnitudes) - 1) + [True]
    # Aligned at the cap with misaligned turns left: it stays there, and the
    # loop stops since nothing changes.
    assert read[-1].misaligned > 0
    assert report.converged and report.rewards["read"] == sign * magnitudes[-1]


@pytest.mark.parametrize("max_reward", [0.5, 1.0 + 1e-12])
def test_a_tier_at_or_above_the_cap_is_dropped_not_moved(max_reward):
    # target 1: read starts at 1, beyond the cap of 0.5 or within rounding of
    # 1 + 1e-12, and is not aligned there. It is dropped: the loop never
    # weakens a tier, nor spends a round on a boost by a rounding error.
    report = calibrate(
        aligned_only_above(), "naive", estimator="mt_grpo", norm="mean", max_reward=max_reward
    )
    assert [it.rewards["read"] for it in report.iterations] == [1.0, 0.0]


@settings(max_examples=60, deadline=None)
@given(rollouts=tiered_batches(), boost=st.sampled_from([1.1, 1.5, 3.0]))
def test_the_loop_only_strengthens_up_to_the_cap_or_drops_and_always_stops(rollouts, boost):
    report = calibrate(rollouts, "naive", estimator="mt_grpo", boost=boost, max_iterations=200)
    # Rewards start at most 1 (target) and at least 0.1 (min_abs_r) in
    # magnitude: ceil(log(20) / log(boost)) boosts reach the cap, then one
    # round may drop the tier, and one more finds nothing to change.
    assert len(report.iterations) <= math.ceil(math.log(20) / math.log(boost)) + 3
    for before, after in zip(report.iterations[:-1], report.iterations[1:], strict=True):
        for tier, value in after.rewards.items():
            old = before.rewards[tier]
            assert abs(value) <= 2.0
            assert value == 0.0 or (np.sign(value) == np.sign(old) and abs(value) >= abs(old))
            if old == 0.0:
                assert value == 0.0


@settings(max_examples=100, deadline=None)
@given(rollouts=tiered_batches(), data=st.data())
def test_mean_advantages_are_plain_means_with_zero_tolerance(rollouts, data):
    rewards = dict(
        zip(
            DEFAULT_TIERS,
            data.draw(st.lists(st.sampled_from([0.0, 0.3, -0.5, 1.0]), min_size=6, max_size=6)),
            strict=True,
        )
    )
    correlations = TierStats.from_rollouts(rollouts).correlations()
    adv = _hybrid_advantages(rollouts, rewards)
    zero = 1e-9 * np.abs(adv).max(initial=0.0)
    for d, c in zip(direction_check(rollouts, rewards, correlations), correlations, strict=True):
        on = rollouts.turn_tiers == rollouts.tiers.index(d.tier)
        plain = adv[on].mean() if on.any() else 0.0
        if abs(plain) <= zero:
            assert d.mean_advantage == 0.0
        else:
            assert d.mean_advantage == pytest.approx(plain, rel=1e-9, abs=zero)
        want = d.exempt or d.turns == 0 or (abs(plain) > zero and np.sign(plain) == np.sign(c.r))
        assert d.aligned == want


def test_tier_files_round_trip_and_presets(tmp_path):
    path = tmp_path / "sub" / "tiers.toml"
    save_tier_rewards({"gold": 1.0, "read": -0.1, "odd tier": 0.5}, path, comment="made by test")
    assert load_tier_rewards(path) == {"gold": 1.0, "read": -0.1, "odd tier": 0.5}
    assert load_tier_rewards("naive") == PRESETS["naive"]
    assert PRESETS["naive"]["read"] == 0.3 and PRESETS["naive"]["write"] == 0.1
    assert set(load_tier_rewards("sparse").values()) == {0.0}
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umask_mode_not_mkstemps(tmp_path, umask):
    import os
    import stat

    from turnrl.irc import write_json_atomic

    old = os.umask(umask)
    try:
        save_tier_rewards({"gold": 1.0}, tmp_path / "tiers.toml")
        write_json_atomic({"a": 1}, tmp_path / "report.json")
        with open(tmp_path / "plain", "w"):  # what any other output gets
            pass
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("tiers.toml", "report.json", "plain"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_written_files_leave_the_process_umask_alone(tmp_path, monkeypatch):
    # Setting the umask to read it changes it for every thread: a file another
    # thread created meanwhile got 0o644 under a private umask of 0o077.
    import os

    from turnrl.irc import write_json_atomic

    def umask(mask):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", umask)
    save_tier_rewards({"gold": 1.0}, tmp_path / "tiers.toml")
    write_json_atomic({"a": 1}, tmp_path / "report.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "tiers.toml"]


def test_tier_file_errors_name_the_file_and_tier(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiers]\ngold = 'high'\n")
    with pytest.raises(ValueError, match=r"bad.toml: tier 'gold' must map to a number"):
        load_tier_rewards(bad)
    bad.write_text("[tiers\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_tier_rewards(bad)
    with pytest.raises(OSError, match="no such tier file"):
        load_tier_rewards(tmp_path / "missing.toml")
    # Bytes that are not UTF-8 (a file saved in Latin-1): named, not a UnicodeDecodeError.
    bad.write_bytes(b"[tiers]\nr\xe9ponse = 0.0\n")
    with pytest.raises(
        InvalidInputError, match=r"bad.toml: not UTF-8 text \(invalid continuation byte at byte 9\)"
    ):
        load_tier_rewards(bad)


def test_a_tier_file_may_start_with_a_byte_order_mark(tmp_path):
    """Some editors save UTF-8 with a BOM; --config files and buffers skip it,
    and tomllib refused it as invalid TOML."""
    tiers = tmp_path / "tiers.toml"
    tiers.write_bytes(b"\xef\xbb\xbf[tiers]\ngold = 1.0\nread = -0.25\n")
    assert load_tier_rewards(tiers) == {"gold": 1.0, "read": -0.25}
    # Only at the very start: elsewhere it is a character TOML refuses.
    tiers.write_bytes(b"[tiers]\n\xef\xbb\xbfgold = 1.0\n")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        load_tier_rewards(tiers)
    # A bad byte after the mark is named at its place in the file.
    tiers.write_bytes(b"\xef\xbb\xbf[tiers]\nr\xe9ponse = 0.0\n")
    with pytest.raises(InvalidInputError, match=r"invalid continuation byte at byte 12\)"):
        load_tier_rewards(tiers)


@pytest.mark.parametrize(
    "tier",
    [
        "café",
        "x²",
        "日本",
        'a"b',
        "a\\b",
        "",
        "a.b",
        "tiers",
        "\x7f\x00\t\n\r\x08\x1f",
        "😀",
        "-_9",
    ],
)
def test_tier_file_keys_follow_toml(tmp_path, tier):
    path = tmp_path / "t.toml"
    save_tier_rewards({tier: 0.25, "gold": 1.0}, path)
    assert load_tier_rewards(path) == {tier: 0.25, "gold": 1.0}
    assert "gold = 1.0" in path.read_text(encoding="utf-8").splitlines()  # bare when allowed


@settings(max_examples=150, deadline=None)
@given(
    rewards=st.dictionaries(
        st.text(), st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=6
    ),
    comment=st.one_of(
        st.none(), st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]) | st.just("\n"))
    ),
)
def test_tier_files_round_trip_any_tier_name(rewards, comment):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiers.toml"
        save_tier_rewards(rewards, path, comment=comment)
        loaded = load_tier_rewards(path)
    assert loaded == rewards and list(loaded) == list(rewards)


def test_tier_file_save_refuses_what_it_cannot_write(tmp_path):
    path = tmp_path / "t.toml"
    for rewards, message in [
        ({}, "no tier rewards"),
        ({"gold": math.inf}, r"tier 'gold' has a non-finite reward"),
        ({"gold": math.nan}, r"tier 'gold' has a non-finite reward"),
        ({"gold": True}, r"tier 'gold' must map to a number"),
        ({"gold": "1"}, r"tier 'gold' must map to a number"),
        ({1: 1.0}, "tier names must be strings"),
        ({"a\ud800": 1.0}, "lone surrogate"),
    ]:
        with pytest.raises(InvalidInputError, match=rf"t\.toml: .*{message}"):
            save_tier_rewards(rewards, path)
    with pytest.raises(
        InvalidInputError, match=r"t\.toml: the comment holds control character U\+0000"
    ):
        save_tier_rewards({"gold": 1.0}, path, comment="a\x00b")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


@pytest.mark.parametrize("value", ["0.5", "[1.0]", "'gold'", "true"])
def test_tier_file_tiers_must_be_a_table(tmp_path, value):
    bad = tmp_path / "bad.toml"
    bad.write_text(f"tiers = {value}\n")
    with pytest.raises(InvalidInputError, match=r"bad\.toml: key 'tiers' must be a table"):
        load_tier_rewards(bad)


def test_tier_file_keys_outside_the_tiers_table_are_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("gold = 1.0\n[tiers]\nread = 0.3\n")
    with pytest.raises(InvalidInputError, match=r"bad\.toml: top-level keys \['gold'\]"):
        load_tier_rewards(bad)
    bad.write_text("gold = 1.0\n[extra]\nread = 0.3\n")
    with pytest.raises(InvalidInputError, match=r"bad\.toml: tier 'extra' must map to a number"):
        load_tier_rewards(bad)


def test_bad_tier_codes_are_value_errors():
    with pytest.raises(ValueError, match=r"turn_tiers\[1\] = 9"):
        TieredRollouts([1.0], [0], [0, 2], [0, 9])


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        # len(tiers) used to get reward 0 and -2 the last tier's reward.
        (
            [0, -1, 6, 6],
            r"turn_tiers\[2\] = 6 but a tier code must be -1 \(no tier\) or in \[0, 6\)",
        ),
        ([5, -2, 0, -2], r"turn_tiers\[1\] = -2 but a tier code must be -1"),
        ([0, 1, 2, -7], r"turn_tiers\[3\] = -7"),
    ],
)
def test_tier_codes_out_of_range_are_refused_at_construction(codes, message):
    with pytest.raises(InvalidInputError, match=message):
        TieredRollouts([1.0, 0.0], [0, 0], [0, 2, 4], codes)


def test_tier_codes_are_checked_against_custom_tiers():
    TieredRollouts([1.0], [0], [0, 2], [1, -1], ("a", "b"))
    with pytest.raises(InvalidInputError, match=r"turn_tiers\[0\] = 2 .* \[0, 2\) for 2 tiers"):
        TieredRollouts([1.0], [0], [0, 2], [2, -1], ("a", "b"))


@pytest.mark.parametrize(
    ("outcome", "group", "offsets", "codes", "message"),
    [
        (
            [1.0, 0.0],
            [0, 0],
            [0, 2],
            [0, 1],
            r"turn_offsets has length 2 but must have length len\(outcome\) \+ 1 = 3",
        ),
        ([1.0, 0.0], [0, 0], [1, 2, 2], [0, 1], r"turn_offsets\[0\] must be 0, got 1"),
        (
            [1.0, 0.0, 1.0],
            [0, 0, 0],
            [0, 2, 1, 3],
            [0, 1, 2],
            r"turn_offsets is not monotone at trajectory 1: turn_offsets\[1\] = 2 > "
            r"turn_offsets\[2\] = 1",
        ),
        ([1.0], [0], [0, 1], [0, 1], r"turn_offsets\[-1\] = 1 but len\(turn_tiers\) = 2"),
        ([1.0], [0, 0], [0, 1], [0], r"group has length 2 but outcome has length 1"),
        ([[1.0]], [0], [0, 1], [0], r"outcome must be one-dimensional, got shape \(1, 1\)"),
        ([1.0], [0], [0, 1], [[0]], r"turn_tiers must be one-dimensional"),
    ],
)
def test_ragged_layout_is_checked_at_construction(outcome, group, offsets, codes, message):
    with pytest.raises(InvalidInputError, match=message):
        TieredRollouts(outcome, group, offsets, codes)


def test_empty_rollouts_are_valid():
    empty = TieredRollouts([], [], [0], [])
    assert empty.num_turns == 0 and TierStats.from_rollouts(empty).trajectories == 0


def test_empty_stats_have_one_array_per_field():
    stats = TierStats.empty(("a", "b", "c"))
    fields = [
        stats.present,
        stats.present_success,
        stats.turns,
        stats.turns_sq,
        stats.turns_success,
    ]
    for i, first in enumerate(fields):
        assert first.shape == (3,) and first.dtype == np.int64 and not first.any()
        for second in fields[i + 1 :]:
            assert not np.shares_memory(first, second)
    stats.present[0] += 1  # the arrays are writable; the others stay zero
    assert stats.turns.tolist() == [0, 0, 0] and stats.turns_sq.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("x", "success"),
    [
        ([1, 1, 0], [1, 1, 0]),
        ([1, 0, 0], [1, 0, 0]),
        ([0, 1, 1], [1, 0, 0]),
        ([1, 1, 0, 0, 0], [1, 1, 0, 0, 0]),
        ([0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]),
        ([2, 2, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]),
        ([1] * 3 + [0] * 8, [1] * 3 + [0] * 8),
        ([0] * 40 + [3] * 23, [1] * 40 + [0] * 23),
    ],
)
def test_perfect_correlations_are_exact_like_scipy(x, success):
    """A tier whose presence (or count) is success, or its complement, up to
    scale: |r| = 1 and p = 0 exactly (r was 0.9999999999999998, p 1.3e-8)."""
    codes: list[int] = []
    offsets = [0]
    for count in x:
        codes.extend([0] * count + [-1])
        offsets.append(len(codes))
    rollouts = TieredRollouts(
        np.array(success, dtype=float), np.zeros(len(x)), offsets, codes, ("t",)
    )
    variable = "count" if max(x) > 1 else "presence"
    (got,) = TierStats.from_rollouts(rollouts).correlations(variable=variable)
    want = scipy_stats.pointbiserialr(x, success)
    assert got.r == pytest.approx(want.statistic, abs=1e-15)
    assert abs(got.r) == 1.0 and got.p_value == 0.0
    assert want.pvalue < 1e-60


def test_online_calibrator_rederives_every_k_steps():
    online = OnlineCalibrator(
        {"good": 0.3, "bad": 0.3, "noise": 0.3, "respond": 0.0},
        tiers=("good", "bad", "noise", "respond"),
        window=3,
        every=2,
        min_trajectories=10,
    )
    first = online.update(planted(seed=10, tasks=30))
    assert first["bad"] == 0.3 and not online.reports
    second = online.update(planted(seed=11, tasks=30))
    assert len(online.reports) == 1 and second["bad"] < 0 < second["good"]
    for seed in range(12, 16):
        online.update(planted(seed=seed, tasks=30))
    assert len(online.history) == 3 and len(online.reports) == 3
    assert online.stats.trajectories == 3 * 30 * 8


def _online(**kwargs):
    settings_ = dict(tiers=("good", "bad", "noise", "respond"), window=3, every=2)
    settings_.update(min_trajectories=10, estimator="mt_grpo", alpha=0.01)
    settings_.update(kwargs)
    return OnlineCalibrator({"good": 0.3, "bad": 0.3, "noise": 0.3, "respond": 0.0}, **settings_)


@pytest.mark.parametrize("stop_after", [1, 2, 3, 5])
def test_a_restored_online_calibrator_goes_on_exactly_as_the_original(tmp_path, stop_after):
    import json

    steps = [planted(seed=20 + i, tasks=12) for i in range(9)]
    original = _online()
    for rollouts in steps[:stop_after]:
        original.update(rollouts)
    reports_before = len(original.reports)
    path = tmp_path / "ckpt" / "online.json"
    original.save(path)
    assert json.loads(path.read_text())["format"] == "turnrl.online_calibrator/1"
    restored = OnlineCalibrator.load(path)
    in_place = _online(window=7, every=5)  # other settings: replaced by the state's
    in_place.load_state_dict(original.state_dict())
    for rollouts in steps[stop_after:]:
        want = original.update(rollouts)
        assert restored.update(rollouts) == want
        assert in_place.update(rollouts) == want
        assert restored.stats == original.stats == in_place.stats
    assert restored.steps == original.steps == len(steps)
    assert restored.calibrate_kwargs == original.calibrate_kwargs
    # Rewards were re-derived after the restore, at the same steps.
    assert len(restored.reports) == len(original.reports) - reports_before > 0
    assert restored.rewards == original.rewards != _online().rewards
    assert restored.state_dict() == original.state_dict()
    assert [p.name for p in path.parent.iterdir()] == ["online.json"]  # no temporary left


@st.composite
def calibrator_steps(draw):
    """Steps' labelled rollouts with tier lists drawn anew (none at all, some
    unlabelled turns only, tiers joining late), outcomes 0 or 1, groups of 1-3."""
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        tiers = tuple(draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True)))
        b = draw(st.integers(1, 8))
        counts = draw(st.lists(st.integers(0, 4), min_size=b, max_size=b))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        n = int(offsets[-1])
        turn_tiers = draw(st.lists(st.integers(-1, len(tiers) - 1), min_size=n, max_size=n))
        outcome = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=b, max_size=b))
        group = np.arange(b) // draw(st.integers(1, 3))
        steps.append(TieredRollouts(outcome, group, offsets, turn_tiers, tiers))
    return steps


@settings(max_examples=80, deadline=None)
@given(steps=calibrator_steps(), data=st.data())
def test_every_state_an_online_calibrator_reaches_round_trips(steps, data):
    """state_dict -> JSON -> from_state_dict -> state_dict gives the state back
    after every step, and the restored calibrator goes on as the original. An
    OnlineCalibrator(tiers=()) re-deriving before any tier was counted held
    an empty rewards table, which from_state_dict (and its own next
    re-derivation) refused."""
    import json

    tiers = data.draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True))
    initial = data.draw(st.sampled_from(["naive", {"a": 0.3}, {"b": -0.1, "z": 1.0}]))
    online = OnlineCalibrator(
        initial,
        tiers=tiers,
        window=data.draw(st.integers(1, 3)),
        every=data.draw(st.integers(1, 3)),
        min_trajectories=data.draw(st.integers(0, 8)),
        estimator=data.draw(st.sampled_from(["gtpo_hybrid", "mt_grpo", "grpo"])),
    )
    restored = OnlineCalibrator.from_state_dict(json.loads(json.dumps(online.state_dict())))
    for rollouts in steps:
        assert restored.update(rollouts) == online.update(rollouts)
        state = online.state_dict()
        assert restored.state_dict() == state
        restored = OnlineCalibrator.from_state_dict(json.loads(json.dumps(state)))
        assert restored.state_dict() == state


def test_a_calibrator_that_counted_no_tier_holds_the_empty_table_and_goes_on():
    """OnlineCalibrator(tiers=()) is a calibrator whose tiers all join as they
    are seen: re-deriving before any is seen gives the empty table (every tier
    0, as the all-zero table a calibrator listing tiers derives), which it
    saves, restores and calibrates from."""
    unlabelled = TieredRollouts([1.0, 0.0], [0, 0], [0, 1, 2], [-1, -1], ())
    online = OnlineCalibrator(tiers=(), every=1, min_trajectories=1)
    assert online.update(unlabelled) == {} and len(online.reports) == 1
    listing = OnlineCalibrator(every=1, min_trajectories=1)
    assert set(listing.update(unlabelled.with_tiers(DEFAULT_TIERS)).values()) == {0.0}
    restored = OnlineCalibrator.from_state_dict(online.state_dict())
    assert restored.rewards == {} and restored.update(unlabelled) == online.update(unlabelled)
    labelled = planted(seed=2, tasks=30)
    assert restored.update(labelled) == online.update(labelled)
    assert online.rewards["good"] > 0 > online.rewards["bad"]
    assert calibrate(labelled, {}).initial.rewards == {}  # an empty start: every tier 0


def test_a_bad_calibrator_state_is_a_clear_error(tmp_path):
    online = _online()
    online.update(planted(seed=1, tasks=12))
    good = online.state_dict()

    def broken(**changes):
        return {**good, **changes}

    cases = [
        (broken(format="turnrl.online_calibrator/0"), r"state\['format'\] must be"),
        (broken(steps="3"), r"state\['steps'\] must be a int"),
        (broken(window=True), r"state\['window'\] must be a int"),
        (broken(steps=0), r"state\['history'\] holds 1 steps, more than state\['steps'\]"),
        (broken(steps=-1), r"state\['steps'\] must be a count, got -1"),
        (broken(history=[{**good["history"][0], "turns": [1, 2]}]),
         r"state\['history'\]\[0\]\['turns'\] must be 4 counts"),
        (broken(history=[{**good["history"][0], "successes": -1}]),
         r"state\['history'\]\[0\]\['successes'\] must be a count"),
        (broken(rewards={"good": float("nan")}), "finite"),
        (broken(tiers=["good", 3]), r"state\['tiers'\] must be a list of tier names"),
        (broken(held=-1), r"state\['held'\] must be a count of at most state\['steps'\] \(1\)"),
        (broken(held=2), r"state\['held'\] must be a count"),
        (broken(held=True), r"state\['held'\] must be a count"),
    ]  # fmt: skip
    for state, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            OnlineCalibrator.from_state_dict(state)
    path = tmp_path / "online.json"
    path.write_text("{not json")
    with pytest.raises(InvalidInputError, match=r"online\.json: not JSON"):
        OnlineCalibrator.load(path)
    with pytest.raises(turnrl.TurnrlIOError, match="no such calibrator state file"):
        OnlineCalibrator.load(tmp_path / "missing.json")


@pytest.mark.parametrize("outcome", [0.0, 1.0])
def test_a_window_of_equal_outcomes_holds_the_rewards_back(outcome):
    """All failing (early training) or all succeeding: no tier tells them
    apart, and zeroing every reward would leave the groups with no signal."""
    start = {"good": 0.3, "bad": 0.3, "noise": 0.3, "respond": 0.0}
    online = _online(window=2, every=1)
    flat = planted(seed=3, tasks=12)
    flat = TieredRollouts(np.full_like(flat.outcome, outcome), *astuple(flat)[1:])
    assert online.update(flat) == start and online.held == 1 and not online.reports
    assert online.update(flat) == start and online.held == 2
    # Once the window holds both, rewards are derived: from the whole window.
    mixed = planted(seed=4, tasks=12)
    rewards = online.update(mixed)
    assert len(online.reports) == 1 and online.held == 2 and rewards != start
    window = TierStats.from_rollouts(flat) + TierStats.from_rollouts(mixed)
    assert online.reports[0].stats == window


def test_the_held_back_count_survives_a_restore():
    """held was not in the state: after a resume the train summary paired the
    restored step count with a held-back count restarted at 0."""
    flat = planted(seed=3, tasks=12)
    flat = TieredRollouts(np.zeros_like(flat.outcome), *astuple(flat)[1:])
    online = _online(window=2, every=1)
    online.update(flat)
    online.update(flat)
    assert online.held == 2
    state = online.state_dict()
    assert state["held"] == 2
    restored = OnlineCalibrator.from_state_dict(state)
    assert restored.held == 2 and restored.state_dict() == state
    restored.update(flat)
    assert restored.held == 3
    # A state saved before held was kept restores with 0, as it did.
    old = {k: v for k, v in state.items() if k != "held"}
    assert OnlineCalibrator.from_state_dict(old).held == 0


def test_tiers_first_seen_later_join_the_calibrator_exactly():
    first = planted(seed=5, tasks=12)
    only_good = TieredRollouts(
        first.outcome,
        first.group,
        first.turn_offsets,
        np.where(first.turn_tiers == 0, 0, -1),
        ("good",),
    )
    online = OnlineCalibrator({"good": 0.5}, tiers=("good",), window=3, every=5)
    online.update(only_good)
    second = planted(seed=6, tasks=12)  # good, bad, noise, respond
    online.update(second)
    assert online.tiers == ("good", "bad", "noise", "respond")
    full = online.tiers
    want = TierStats.from_rollouts(only_good.with_tiers(full)) + TierStats.from_rollouts(second)
    assert online.stats == want
    restored = OnlineCalibrator.from_state_dict(online.state_dict())
    assert restored.stats == want and restored.tiers == full
    with pytest.raises(InvalidInputError, match=r"tiers \['bad', 'noise', 'respond'\] are not in"):
        TierStats.from_rollouts(second).with_tiers(("good",))


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"estimator": "gtpo_hybird"}, "calibrate_kwargs: unknown estimator 'gtpo_hybird'"),
        ({"alpha": -1.0}, "alpha"),
        ({"target": 0.0}, "target"),
        ({"success_threshold": float("nan")}, "success_threshold"),
        ({"gama": 0.9}, "calibrate_kwargs: .*gama"),
        ({"variable": "x"}, "calibrate_kwargs: .*variable"),
        ({"confidence": 2.0}, "calibrate_kwargs: .*confidence"),
        ({"stats": None}, r"calibrate_kwargs cannot set \['stats'\]"),
        ({"gamma": 1.5}, "calibrate_kwargs: gamma is a discount factor"),
    ],
)
def test_online_calibrator_settings_are_checked_when_it_is_made(settings_, message):
    with pytest.raises(InvalidInputError, match=message):
        OnlineCalibrator("naive", **settings_)
    # A checkpoint holding them is refused the same way when it is read.
    state = {**OnlineCalibrator("naive").state_dict(), "calibrate_kwargs": settings_}
    with pytest.raises(InvalidInputError, match=message):
        OnlineCalibrator.from_state_dict(state)


def test_a_held_back_rederivation_is_tried_at_every_step_until_it_happens():
    flat = planted(seed=3, tasks=12)
    flat = TieredRollouts(np.zeros_like(flat.outcome), *astuple(flat)[1:])
    online = _online(every=3, window=1, min_trajectories=1)
    for _ in range(3):
        online.update(flat)
    assert online.held == 1 and online.pending and not online.reports
    restored = OnlineCalibrator.from_state_dict(online.state_dict())
    for calibrator in (online, restored):
        assert calibrator.pending
        calibrator.update(planted(seed=4, tasks=12))  # step 4: not a multiple of 3
        assert len(calibrator.reports) == 1 and not calibrator.pending
        calibrator.update(flat)  # step 5: not due, nothing pending
        assert len(calibrator.reports) == 1 and calibrator.held == 1  # restored too
    legacy = online.state_dict()
    del legacy["pending"]  # written before it was kept
    assert OnlineCalibrator.from_state_dict(legacy).pending is False


def test_default_tiers_match_design():
    assert DEFAULT_TIERS == ("gold", "soft", "read", "write", "error", "respond")


@settings(max_examples=60, deadline=None)
@given(records=labelled_records())
def test_records_in_memory_give_the_tier_columns_the_buffer_reader_gives(records):
    from turnrl.irc import tiered_from_batch, tiered_from_records

    mine = tiered_from_records(records)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step.jsonl"
        with turnrl.RolloutWriter(path) as writer:
            writer.write_many(records)
        batch = turnrl.read_rollouts(path)
        theirs = tiered_from_batch(batch)
    assert mine.tiers[: len(DEFAULT_TIERS)] == DEFAULT_TIERS
    np.testing.assert_array_equal(mine.outcome, theirs.outcome)
    np.testing.assert_array_equal(mine.turn_offsets, theirs.turn_offsets)
    # Same partition into groups, same tier of every turn, whatever the codes.
    np.testing.assert_array_equal(
        np.unique(mine.group, return_inverse=True)[1],
        np.unique(theirs.group, return_inverse=True)[1],
    )
    names = lambda t: [None if c < 0 else t.tiers[c] for c in t.turn_tiers]  # noqa: E731
    assert names(mine) == names(theirs)


def test_an_empty_group_name_is_a_group_as_the_buffer_reader_reads_it(tmp_path):
    """Group "" was taken for "no group" and replaced by the task id: two
    tasks' records in group "" were two groups, and "" of task "t" joined
    group "t", where the buffer reader (and the estimators) see one group,
    and two."""
    from turnrl.irc import tiered_from_batch, tiered_from_records

    turns = [{"role": "assistant", "content": ".", "tier": "read"}]
    records = [
        turnrl.rollout_record("a", "", 0, 1.0, turns),
        turnrl.rollout_record("b", "", 1, 0.0, turns),
        turnrl.rollout_record("t", "", 2, 1.0, turns),
        turnrl.rollout_record("t", "t", 3, 0.0, turns),
    ]
    path = tmp_path / "step.jsonl"
    with turnrl.RolloutWriter(path) as writer:
        writer.write_many(records)
    batch = turnrl.read_rollouts(path)
    assert batch.skipped == 0
    assert tiered_from_batch(batch).group.tolist() == [0, 0, 0, 1]
    assert tiered_from_records(records).group.tolist() == [0, 0, 0, 1]
    # A record without a group (the reader refuses it) is its task's group.
    loose = [{k: v for k, v in r.items() if k != "group"} for r in records]
    assert tiered_from_records(loose).group.tolist() == [0, 1, 2, 2]


def test_records_without_usable_outcomes_or_tiers_are_named():
    from turnrl.irc import tiered_from_records

    good = turnrl.rollout_record("t", "g", 0, 1.0, [{"role": "assistant", "tier": "read"}])
    with pytest.raises(InvalidInputError, match=r"record 1 \(task 't', sample 0\).*outcome"):
        tiered_from_records([good, {**good, "outcome": None}])
    bad_tier = {**good, "turns": [{"role": "assistant", "tier": 3}]}
    with pytest.raises(InvalidInputError, match=r"record 0 .*tier must be a string, got 3"):
        tiered_from_records([bad_tier])
    # Outcomes the buffer reader refuses are refused here too (bools and
    # numeric strings were taken as numbers, NaN reached the statistics).
    # An int too large for a float (json.loads gives one for 1 and 400 zeros)
    # is beyond 1e100 too, not an OverflowError.
    for outcome in (True, "1", float("nan"), float("inf"), 1e101, 10**400, -(10**400)):
        with pytest.raises(InvalidInputError, match=r"record 0 .*outcome must be a number"):
            tiered_from_records([{**good, "outcome": outcome}])
    for outcome in (1, -2, 0.5, np.float32(1.0), np.int64(0), 1e100):
        assert tiered_from_records([{**good, "outcome": outcome}]).outcome.tolist() == [
            float(outcome)
        ]


def test_a_custom_estimator_needing_bigger_groups_is_taken(monkeypatch):
    import turnrl.advantages

    def four_or_more(batch):
        if min(np.bincount(batch.group)) < 4:
            raise InvalidInputError("groups must have at least 4 trajectories")
        return np.zeros(len(batch.turn_rewards))

    monkeypatch.setitem(turnrl.advantages._REGISTRY, "four_or_more", four_or_more)
    online = OnlineCalibrator("naive", estimator="four_or_more")
    assert online.calibrate_kwargs == {"estimator": "four_or_more"}


def _by_tier(iteration):
    """An iteration's rewards and directions keyed by tier, whatever their order."""
    return iteration.rewards, {d.tier: d for d in iteration.directions}


@settings(max_examples=60, deadline=None)
@given(rollouts=tiered_batches(), data=st.data())
def test_stats_given_in_another_tier_order_or_with_more_tiers_calibrate_as_the_rollouts_own(
    rollouts, data
):
    """calibrate(stats=) matches the statistics' tiers to the rollouts' by name:
    reordered, or with tiers the rollouts lack (zero sums), they give what the
    rollouts' own statistics give, the extra tiers rewarded 0."""
    if data.draw(st.booleans()):
        rollouts = planted(seed=data.draw(st.integers(0, 3)), tasks=20)  # some tiers significant
    extra = data.draw(st.lists(st.sampled_from(["x", "y"]), unique=True))
    order = data.draw(st.permutations([*rollouts.tiers, *extra]))
    stats = TierStats.from_rollouts(rollouts).with_tiers(order)
    want = calibrate(rollouts, "naive", estimator="mt_grpo")
    got = calibrate(rollouts, "naive", estimator="mt_grpo", stats=stats)
    assert got.rewards == {**want.rewards, **dict.fromkeys(extra, 0.0)}
    # NaN (a success rate with no trajectory to take it over) equals NaN here.
    np.testing.assert_equal(
        {c.tier: astuple(c) for c in got.correlations if c.tier not in extra},
        {c.tier: astuple(c) for c in want.correlations},
    )
    assert len(got.iterations) == len(want.iterations)
    for mine, theirs in zip(
        [got.initial, *got.iterations], [want.initial, *want.iterations], strict=True
    ):
        rewards, directions = _by_tier(mine)
        want_rewards, want_directions = _by_tier(theirs)
        assert {t: v for t, v in rewards.items() if t not in extra} == want_rewards
        assert directions == want_directions  # the direction check runs on the rollouts' tiers


def test_stats_lacking_a_tier_of_the_rollouts_are_refused():
    """Statistics without one of the rollouts' tiers gave that tier r = 0, so
    reward 0 and an exempt direction check, unsaid; with other tier names
    altogether every tier did (a calibration that 'converged' on nothing)."""
    rollouts = planted(seed=1, tasks=30)
    stats = TierStats.from_rollouts(rollouts)
    assert calibrate(rollouts, "naive", stats=stats).rewards["good"] > 0
    fewer = TierStats.from_rollouts(
        TieredRollouts(
            rollouts.outcome,
            rollouts.group,
            rollouts.turn_offsets,
            np.where(rollouts.turn_tiers == 0, -1, rollouts.turn_tiers - 1),
            rollouts.tiers[1:],
        )
    )
    renamed = TierStats(("a", "b", "c", "d"), *astuple(stats)[1:])
    for other, lacking in ((fewer, "['good']"), (renamed, "['good', 'bad', 'noise', 'respond']")):
        message = (
            rf"stats are over tiers {re.escape(str(other.tiers))} but the rollouts' tiers are "
            rf"{re.escape(str(rollouts.tiers))}: {re.escape(lacking)} have no statistics"
        )
        with pytest.raises(InvalidInputError, match=message):
            calibrate(rollouts, "naive", stats=other)


def test_a_tier_named_twice_is_refused_wherever_tiers_are_given():
    """("good", "bad", "noise", "good"): rewards are keyed by name, so the second
    "good" (no turns, r = 0) hid the first, and calibrate gave the tier that
    predicted success best a reward of 0."""
    from turnrl.irc import tiered_from_records

    p = planted(seed=1, tasks=30)
    twice = ("good", "bad", "noise", "good")
    message = r"tiers \('good', 'bad', 'noise', 'good'\) name tier 'good' more than once"
    with pytest.raises(InvalidInputError, match=message):
        TieredRollouts(p.outcome, p.group, p.turn_offsets, p.turn_tiers, twice)
    with pytest.raises(InvalidInputError, match=message):
        TierStats.empty(twice)
    with pytest.raises(InvalidInputError, match=message):
        OnlineCalibrator("naive", tiers=twice)
    record = turnrl.rollout_record("t", "g", 0, 1.0, [{"role": "assistant", "tier": "good"}])
    with pytest.raises(InvalidInputError, match=message):
        tiered_from_records([record], tiers=twice)
    with pytest.raises(InvalidInputError, match="name tier 'bad' more than once"):
        TierStats.from_rollouts(p).with_tiers(("good", "bad", "noise", "respond", "bad"))
    # Named once, the tier keeps its reward.
    assert calibrate(p, "naive").rewards["good"] > 0


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ({"every": 2.5}, "every must be an integer >= 1, got 2.5"),
        ({"every": "3"}, "every must be an integer >= 1, got '3'"),
        ({"every": 0}, "every must be an integer >= 1, got 0"),
        ({"window": 2.5}, "window must be an integer >= 1, got 2.5"),
        ({"window": True}, "window must be an integer >= 1, got True"),
        ({"min_trajectories": "64"}, "min_trajectories must be an integer >= 0, got '64'"),
        ({"min_trajectories": None}, "min_trajectories must be an integer >= 0, got None"),
        ({"min_trajectories": -1}, "min_trajectories must be an integer >= 0, got -1"),
    ],
)
def test_window_every_and_min_trajectories_are_checked_when_it_is_made(settings_, message):
    """They were not: every=2.5 ran and saved checkpoints that load() refused,
    min_trajectories="64" failed with a TypeError at the first re-derivation."""
    with pytest.raises(InvalidInputError, match=message):
        OnlineCalibrator("naive", **settings_)
    # What a calibrator is made with, its checkpoint restores.
    online = OnlineCalibrator("naive", window=1, every=1, min_trajectories=0)
    online.update(planted(seed=2, tasks=4))
    assert OnlineCalibrator.from_state_dict(online.state_dict()).state_dict() == online.state_dict()


def test_numpy_integer_settings_are_integers():
    """A window read from a numpy array is an integer: taken, and stored as a
    Python int so that its checkpoint holds plain JSON."""
    online = OnlineCalibrator(
        "naive", window=np.int64(2), every=np.int32(1), min_trajectories=np.uint8(0)
    )
    online.update(planted(seed=2, tasks=4))
    state = online.state_dict()
    assert OnlineCalibrator.from_state_dict(state).state_dict() == state
    assert type(online.every) is int and type(online.min_trajectories) is int
    assert online.history.maxlen == 2


def test_an_r_equal_to_min_abs_r_is_kept_as_scipy_computes_it():
    """Presence 0,0,0,1,1,0,1,0,1 against success 0,0,0,0,0,1,1,1,1: r = 1/10
    exactly (scipy: 0.1). It came out 0.09999999999999998, below min_abs_r =
    0.1, and the tier was dropped. (Rust change: needs the rebuilt extension.)"""
    rollouts = TieredRollouts(
        np.array([0.0] * 5 + [1.0] * 4),
        np.arange(9),
        np.array([0, 0, 0, 0, 1, 2, 2, 3, 3, 4]),
        np.zeros(4, dtype=np.int64),
        ("gold",),
    )
    x = np.array([0, 0, 0, 1, 1, 0, 1, 0, 1.0])
    (c,) = TierStats.from_rollouts(rollouts).correlations()
    assert c.r == scipy_stats.pearsonr(x, rollouts.outcome).statistic == 0.1
    rewards = rewards_from_correlations([c], alpha=1.0, min_abs_r=0.1)
    assert rewards == {"gold": 1.0}
