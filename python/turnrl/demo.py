"""The embedded demo: synthetic tool-calling rollouts with planted reward tiers.

It needs no data and no model. Each task is sampled ``group_size`` times;
every assistant turn gets a tier (gold, soft, read, write, error, respond)
drawn from a latent per-rollout skill, and success depends on the gold and
error turns only, so ``read`` is about as common in failures as in successes.
``turnrl demo`` runs Iterative Reward Calibration on it and shows, per
estimator, how many turns get an advantage of the wrong sign with the
paper's naive dense rewards and with the calibrated ones.
"""

from __future__ import annotations

import numpy as np

from turnrl.calibration import DEFAULT_TIERS, TieredRollouts

__all__ = ["generate"]


def generate(tasks: int = 256, group_size: int = 8, seed: int = 0) -> TieredRollouts:
    """Sample ``tasks * group_size`` synthetic rollouts (2 to 12 turns each)."""
    rng = np.random.default_rng(seed)
    trajectories = tasks * group_size
    skill = rng.uniform(0, 1, size=trajectories)
    counts = rng.integers(2, 13, size=trajectories)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    turn_skill = np.repeat(skill, counts)
    # Tier probabilities per turn, in DEFAULT_TIERS order: skill moves mass
    # from error to gold; soft, read and write do not depend on it.
    gold = 0.05 + 0.25 * turn_skill
    error = 0.20 - 0.15 * turn_skill
    soft = np.full_like(gold, 0.10)
    read = np.full_like(gold, 0.30)
    write = np.full_like(gold, 0.10)
    respond = 1.0 - (gold + error + soft + read + write)
    probs = np.stack([gold, soft, read, write, error, respond], axis=1)
    draws = rng.uniform(0, 1, size=(len(turn_skill), 1))
    tiers = np.minimum((draws > probs.cumsum(axis=1)).sum(axis=1), len(DEFAULT_TIERS) - 1)
    traj_of_turn = np.repeat(np.arange(trajectories), counts)
    golds = np.bincount(traj_of_turn, tiers == DEFAULT_TIERS.index("gold"), trajectories)
    errors = np.bincount(traj_of_turn, tiers == DEFAULT_TIERS.index("error"), trajectories)
    logit = 1.2 * golds - 1.0 * errors - 1.0
    outcome = (rng.uniform(0, 1, size=trajectories) < 1 / (1 + np.exp(-logit))).astype(float)
    group = np.repeat(np.arange(tasks), group_size)
    return TieredRollouts(outcome, group, offsets, tiers, DEFAULT_TIERS)
