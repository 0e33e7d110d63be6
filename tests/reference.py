"""Plain numpy references that the Rust core is checked against.

Written for clarity, not speed: one group at a time, one position at a time,
returns as explicit discounted sums rather than the core's backward recursion.
"""

from __future__ import annotations

import numpy as np


def group_normalize(values: np.ndarray, norm: str, eps: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if norm == "none":
        return values.copy()
    if values.size <= 1 or np.all(values == values[0]):
        return np.zeros_like(values)
    centered = values - values.mean()
    if norm == "mean":
        return centered
    scale = values.std(ddof=1) + eps
    if scale == 0:  # eps = 0 and squared deviations that all underflow (1e-170 apart)
        return np.zeros_like(values)
    return centered / scale


def turn_normalize(per_traj: list[np.ndarray], norm: str, eps: float, turn_norm: str):
    if turn_norm == "pooled":
        flat = group_normalize(np.concatenate(per_traj) if per_traj else np.zeros(0), norm, eps)
        cuts = np.cumsum([len(v) for v in per_traj])[:-1]
        return np.split(flat, cuts)
    result = [np.zeros(len(v)) for v in per_traj]
    longest = max((len(v) for v in per_traj), default=0)
    for k in range(longest):
        having = [m for m, v in enumerate(per_traj) if len(v) > k]
        normed = group_normalize(np.array([per_traj[m][k] for m in having]), norm, eps)
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
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        outcome_adv = group_normalize(outcome[members], norm, eps)
        rewards = [turn_rewards[turn_offsets[i] : turn_offsets[i + 1]] for i in members]
        if estimator == "grpo":
            per_traj = [np.full(len(r), a) for r, a in zip(rewards, outcome_adv, strict=True)]
        elif estimator == "mt_grpo":
            lam_ = 1.0 if lam is None else lam
            turn_adv = turn_normalize(rewards, norm, eps, turn_norm)
            per_traj = [a + lam_ * t for t, a in zip(turn_adv, outcome_adv, strict=True)]
        elif estimator == "gtpo_hybrid":
            gamma_ = 0.9 if gamma is None else gamma
            lam_ = 0.3 if lam is None else lam
            returns = [
                discounted_returns(r, outcome[i], gamma_)
                for r, i in zip(rewards, members, strict=True)
            ]
            turn_adv = turn_normalize(returns, norm, eps, turn_norm)
            per_traj = [t + lam_ * a for t, a in zip(turn_adv, outcome_adv, strict=True)]
        else:
            raise ValueError(estimator)
        for i, values in zip(members, per_traj, strict=True):
            out[turn_offsets[i] : turn_offsets[i + 1]] = values
    return out


def reference_broadcast(turn_adv, turn_offsets, token_turn) -> np.ndarray:
    out = np.zeros(token_turn.shape)
    for b in range(token_turn.shape[0]):
        for t in range(token_turn.shape[1]):
            k = token_turn[b, t]
            if k >= 0:
                out[b, t] = turn_adv[turn_offsets[b] + k]
    return out
