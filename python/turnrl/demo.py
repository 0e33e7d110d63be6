"""The embedded demo: synthetic tool-calling rollouts with planted reward tiers.

It needs no data and no model. Each task is sampled ``group_size`` times;
every assistant turn gets a tier (gold, soft, read, write, error, respond)
drawn from a latent per-rollout skill, and success depends on the gold and
error turns only, so ``read`` is as common in failures as in successes. The
demo then runs each advantage estimator with the paper's naive dense rewards
and reports, per tier, the correlation of tier presence with success and how
many turns get an advantage of the wrong sign (the figure IRC drives down).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from turnrl.advantages import compute_advantages

__all__ = ["NAIVE_REWARDS", "TIERS", "DemoRollouts", "TierReport", "generate", "tier_report"]

TIERS = ("gold", "soft", "read", "write", "error", "respond")

# The paper's naive dense values for read (+0.3) and write (+0.1); the others
# are the obvious choices for a dense per-turn scheme.
NAIVE_REWARDS = {"gold": 1.0, "soft": 0.5, "read": 0.3, "write": 0.1, "error": -0.5, "respond": 0.0}


@dataclass(frozen=True)
class DemoRollouts:
    """A ragged batch of synthetic rollouts in CSR form, with tier codes."""

    outcome: np.ndarray
    group: np.ndarray
    turn_offsets: np.ndarray
    turn_tiers: np.ndarray  # index into TIERS, one per turn

    def turn_rewards(self, rewards: dict[str, float]) -> np.ndarray:
        """Per-turn rewards from a tier -> reward table."""
        table = np.array([rewards.get(tier, 0.0) for tier in TIERS])
        return table[self.turn_tiers]


def generate(tasks: int = 256, group_size: int = 8, seed: int = 0) -> DemoRollouts:
    """Sample ``tasks * group_size`` synthetic rollouts (2 to 12 turns each)."""
    rng = np.random.default_rng(seed)
    trajectories = tasks * group_size
    skill = rng.uniform(0, 1, size=trajectories)
    counts = rng.integers(2, 13, size=trajectories)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    turn_skill = np.repeat(skill, counts)
    # Tier probabilities per turn: skill moves mass from error/soft to gold;
    # read, write and respond stay as common whatever the skill.
    gold = 0.05 + 0.25 * turn_skill
    error = 0.20 - 0.15 * turn_skill
    soft = np.full_like(gold, 0.10)
    read = np.full_like(gold, 0.30)
    write = np.full_like(gold, 0.10)
    respond = 1.0 - (gold + error + soft + read + write)
    probs = np.stack([gold, soft, read, write, error, respond], axis=1)
    cumulative = probs.cumsum(axis=1)
    draws = rng.uniform(0, 1, size=(len(turn_skill), 1))
    tiers = np.minimum((draws > cumulative).sum(axis=1), len(TIERS) - 1)
    traj_of_turn = np.repeat(np.arange(trajectories), counts)
    golds = np.bincount(traj_of_turn, tiers == 0, minlength=trajectories)
    errors = np.bincount(traj_of_turn, tiers == 4, minlength=trajectories)
    logit = 1.2 * golds - 1.0 * errors - 1.0
    outcome = (rng.uniform(0, 1, size=trajectories) < 1 / (1 + np.exp(-logit))).astype(float)
    group = np.repeat(np.arange(tasks), group_size).astype(np.int64)
    return DemoRollouts(outcome, group, offsets, tiers.astype(np.int64))


@dataclass(frozen=True)
class TierReport:
    """One tier under one estimator."""

    tier: str
    turns: int
    r_pb: float
    reward: float
    mean_advantage: float
    misaligned: int


def tier_report(
    rollouts: DemoRollouts, estimator: str, rewards: dict[str, float], **params: float | str
) -> list[TierReport]:
    """Per tier: point-biserial correlation of presence with success, and the
    turns whose advantage has the opposite sign (tiers with reward 0 exempt)."""
    turn_rewards = rollouts.turn_rewards(rewards)
    advantages = compute_advantages(
        estimator, rollouts.outcome, rollouts.group, turn_rewards, rollouts.turn_offsets, **params
    )
    counts = np.diff(rollouts.turn_offsets)
    traj_of_turn = np.repeat(np.arange(len(counts)), counts)
    success = rollouts.outcome > 0.5
    reports = []
    for code, tier in enumerate(TIERS):
        on_tier = rollouts.turn_tiers == code
        present = np.bincount(traj_of_turn, on_tier, minlength=len(counts)) > 0
        # Pearson correlation of a 0/1 variable with success is the point-biserial r.
        if present.all() or not present.any() or success.all() or not success.any():
            r_pb = 0.0
        else:
            r_pb = float(np.corrcoef(present, success)[0, 1])
        tier_adv = advantages[on_tier]
        exempt = rewards.get(tier, 0.0) == 0.0 or r_pb == 0.0
        misaligned = 0 if exempt else int(np.sum(np.sign(tier_adv) == -np.sign(r_pb)))
        reports.append(
            TierReport(
                tier,
                int(on_tier.sum()),
                r_pb,
                rewards.get(tier, 0.0),
                float(tier_adv.mean()) if tier_adv.size else 0.0,
                misaligned,
            )
        )
    return reports
