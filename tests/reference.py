"""Plain numpy references that the Rust core is checked against.

Written for clarity, not speed: one group at a time, one position at a time,
returns as explicit discounted sums rather than the core's backward recursion.
"""

from __future__ import annotations

import numpy as np


def group_normalize(
    values: np.ndarray, norm: str, eps: float, batch_values: np.ndarray | None = None
) -> np.ndarray:
    """GN of one group's set. ``batch_values``: the same kind of values over
    the whole batch, whose std ``norm="batch"`` divides by."""
    values = np.asarray(values, dtype=np.float64)
    if norm == "none":
        return values.copy()
    if values.size <= 1 or np.all(values == values[0]):
        return np.zeros_like(values)
    centered = values - values.mean()
    if norm == "mean":
        return centered
    if norm == "rloo":
        # Leave one out, as written: each value minus the mean of the others.
        n = values.size
        return np.array([values[i] - np.delete(values, i).sum() / (n - 1) for i in range(n)])
    if norm == "batch":
        batch_values = np.asarray(batch_values, dtype=np.float64)
        if batch_values.size <= 1:
            return np.zeros_like(values)
        # The std of the raw values, as TRL takes it (not of group-centred ones).
        scale = batch_values.std(ddof=1) + eps
        # A std of 0 (eps = 0, squared deviations that all underflow), or one
        # so small that its reciprocal overflows.
        with np.errstate(divide="ignore", over="ignore"):
            if not np.isfinite(1.0 / scale):
                return np.zeros_like(values)
        return centered / scale
    scale = values.std(ddof=1) + eps
    if scale == 0:  # eps = 0 and squared deviations that all underflow (1e-170 apart)
        return np.zeros_like(values)
    return centered / scale


def batch_sets(per_traj: list[np.ndarray], turn_norm: str) -> list[np.ndarray]:
    """The batch-wide sets ``norm="batch"`` takes the std of: every turn value
    (pooled: one set), or the values at each turn index k (position)."""
    if turn_norm == "pooled":
        return [np.concatenate(per_traj) if per_traj else np.zeros(0)]
    longest = max((len(v) for v in per_traj), default=0)
    return [np.array([v[k] for v in per_traj if len(v) > k]) for k in range(longest)]


def turn_normalize(
    per_traj: list[np.ndarray],
    norm: str,
    eps: float,
    turn_norm: str,
    batch: list[np.ndarray] | None = None,
):
    """GN_k of one group's turn values; ``batch``: :func:`batch_sets` of the
    whole batch (for ``norm="batch"``)."""
    batch = batch_sets(per_traj, turn_norm) if batch is None else batch
    if turn_norm == "pooled":
        flat = np.concatenate(per_traj) if per_traj else np.zeros(0)
        flat = group_normalize(flat, norm, eps, batch[0])
        cuts = np.cumsum([len(v) for v in per_traj])[:-1]
        return np.split(flat, cuts)
    result = [np.zeros(len(v)) for v in per_traj]
    longest = max((len(v) for v in per_traj), default=0)
    for k in range(longest):
        having = [m for m, v in enumerate(per_traj) if len(v) > k]
        normed = group_normalize(np.array([per_traj[m][k] for m in having]), norm, eps, batch[k])
        for m, value in zip(having, normed, strict=True):
            result[m][k] = value
    return result


def discounted_returns(rewards: np.ndarray, outcome: float, gamma: float) -> np.ndarray:
    turns = len(rewards)
    return np.array(
        [
            sum(gamma ** (j - k) * rewards[j] for j in range(k, turns))
            + gamma ** (turns - k) * outcome
            for k in range(turns)
        ]
    )


def reference_advantages(
    estimator,
    outcome,
    group,
    turn_rewards,
    turn_offsets,
    norm="std",
    eps=1e-6,
    gamma=None,
    lam=None,
    turn_norm="position",
) -> np.ndarray:
    outcome = np.asarray(outcome, dtype=np.float64)
    group = np.asarray(group)
    turn_rewards = np.asarray(turn_rewards, dtype=np.float64)
    turn_offsets = np.asarray(turn_offsets)
    out = np.zeros(len(turn_rewards))
    rewards = [turn_rewards[turn_offsets[i] : turn_offsets[i + 1]] for i in range(len(outcome))]
    # Each trajectory's turn values: the estimator's GN_k operand.
    if estimator == "mt_grpo":
        values = rewards
    elif estimator == "gtpo_hybrid":
        gamma_ = 0.9 if gamma is None else gamma
        values = [discounted_returns(r, o, gamma_) for r, o in zip(rewards, outcome, strict=True)]
    elif estimator != "grpo":
        raise ValueError(estimator)
    batch = None if estimator == "grpo" else batch_sets(values, turn_norm)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        outcome_adv = group_normalize(outcome[members], norm, eps, outcome)
        if estimator == "grpo":
            per_traj = [
                np.full(len(rewards[i]), a) for i, a in zip(members, outcome_adv, strict=True)
            ]
        else:
            mine = [values[i] for i in members]
            turn_adv = turn_normalize(mine, norm, eps, turn_norm, batch)
            if estimator == "mt_grpo":
                lam_ = 1.0 if lam is None else lam
                per_traj = [a + lam_ * t for t, a in zip(turn_adv, outcome_adv, strict=True)]
            else:
                lam_ = 0.3 if lam is None else lam
                per_traj = [t + lam_ * a for t, a in zip(turn_adv, outcome_adv, strict=True)]
        for i, advantages in zip(members, per_traj, strict=True):
            out[turn_offsets[i] : turn_offsets[i + 1]] = advantages
    return out


def reference_broadcast(turn_adv, turn_offsets, token_turn) -> np.ndarray:
    out = np.zeros(token_turn.shape)
    for b in range(token_turn.shape[0]):
        for t in range(token_turn.shape[1]):
            k = token_turn[b, t]
            if k >= 0:
                out[b, t] = turn_adv[turn_offsets[b] + k]
    return out
