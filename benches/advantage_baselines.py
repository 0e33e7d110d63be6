"""Baselines for the advantage benchmarks: the GTPO hybrid written as fast as
vectorised numpy allows, and as a verl-style Python loop over groups.

Both compute ``gtpo_hybrid`` with ``norm="std"`` and ``turn_norm="position"``
(the defaults), so their results are checked against turnrl's in the same run.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def make_batch(turns: int, group_size: int = 8, max_turns: int = 40, seed: int = 0):
    """About ``turns`` turns: groups of ``group_size``, 1 to ``max_turns`` turns
    per trajectory, tier-like reward levels, binary outcomes."""
    rng = np.random.default_rng(seed)
    trajectories = max(group_size, int(turns / ((1 + max_turns) / 2)))
    trajectories -= trajectories % group_size
    counts = rng.integers(1, max_turns + 1, size=trajectories)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    group = (np.arange(trajectories) // group_size).astype(np.int64)
    outcome = rng.integers(0, 2, size=trajectories).astype(np.float64)
    rewards = rng.choice([0.0, 0.3, -0.1, 1.0], size=int(offsets[-1]))
    return outcome, group, rewards, offsets


def numpy_gtpo_hybrid(outcome, group, rewards, offsets, gamma=0.9, lam=0.3, eps=1e-6):
    """Vectorised numpy: group statistics with bincount, discounted returns by
    a backward recursion vectorised across trajectories."""
    counts = np.diff(offsets)
    trajectories = len(outcome)
    traj_of_turn = np.repeat(np.arange(trajectories), counts)
    position = np.arange(len(rewards)) - offsets[traj_of_turn]
    _, gid = np.unique(group, return_inverse=True)

    def normalize(values, keys, n_keys):
        n = np.bincount(keys, minlength=n_keys).astype(np.float64)
        mean = np.bincount(keys, values, minlength=n_keys) / np.maximum(n, 1)
        dev = values - mean[keys]
        var = np.bincount(keys, dev * dev, minlength=n_keys) / np.maximum(n - 1, 1)
        return np.where(n[keys] > 1, dev / (np.sqrt(var)[keys] + eps), 0.0)

    outcome_adv = normalize(outcome, gid, gid.max() + 1)

    # Backward recursion on a padded [B, max_turns] grid, vectorised across
    # trajectories. (A global reverse cumsum rescaled by gamma^-k is faster
    # but loses about 1e-10 to cancellation, which std-normalisation of
    # near-constant sets blows up to 1e-4.)
    max_turns = int(counts.max())
    grid = np.zeros((trajectories, max_turns))
    grid[traj_of_turn, position] = rewards
    valid = np.arange(max_turns)[None, :] < counts[:, None]
    returns_grid = np.zeros((trajectories, max_turns))
    ret = outcome.copy()
    for k in range(max_turns - 1, -1, -1):
        ret = np.where(valid[:, k], grid[:, k] + gamma * ret, ret)
        returns_grid[:, k] = ret
    returns = returns_grid[traj_of_turn, position]

    turn_keys = gid[traj_of_turn] * max_turns + position
    turn_adv = normalize(returns, turn_keys, (gid.max() + 1) * max_turns)
    return turn_adv + lam * outcome_adv[traj_of_turn]


def loop_gtpo_hybrid(outcome, group, rewards, offsets, gamma=0.9, lam=0.3, eps=1e-6):
    """The way verl's GRPO estimator is written: a Python dict of groups, then
    a loop over groups (numpy inside), here extended to turns."""
    members_of = defaultdict(list)
    for i in range(len(outcome)):
        members_of[int(group[i])].append(i)
    out = np.zeros(len(rewards))
    for members in members_of.values():
        scores = np.array([outcome[i] for i in members])
        if len(members) > 1:
            outcome_adv = (scores - scores.mean()) / (scores.std(ddof=1) + eps)
        else:
            outcome_adv = np.zeros(1)
        returns = {}
        for i in members:
            turn_rewards = rewards[offsets[i] : offsets[i + 1]]
            ret = outcome[i]
            values = [0.0] * len(turn_rewards)
            for k in range(len(turn_rewards) - 1, -1, -1):
                ret = turn_rewards[k] + gamma * ret
                values[k] = ret
            returns[i] = values
        by_position = defaultdict(list)
        for i in members:
            for k, value in enumerate(returns[i]):
                by_position[k].append(value)
        stats = {}
        for k, values in by_position.items():
            arr = np.array(values)
            stats[k] = (arr.mean(), arr.std(ddof=1) + eps) if len(arr) > 1 else None
        for m, i in enumerate(members):
            for k, value in enumerate(returns[i]):
                turn_adv = 0.0 if stats[k] is None else (value - stats[k][0]) / stats[k][1]
                out[offsets[i] + k] = turn_adv + lam * outcome_adv[m]
    return out
