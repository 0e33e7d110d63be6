"""The ``turnrl`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from turnrl import __version__
from turnrl.advantages import estimator_names


def _demo(args: argparse.Namespace) -> int:
    from turnrl.demo import NAIVE_REWARDS, generate, tier_report

    rollouts = generate(tasks=args.tasks, group_size=args.group_size, seed=args.seed)
    trajectories = len(rollouts.outcome)
    print(
        f"{trajectories} synthetic rollouts ({args.tasks} tasks x {args.group_size}), "
        f"{len(rollouts.turn_tiers)} turns, success rate {rollouts.outcome.mean():.2f}"
    )
    print(
        "naive dense tier rewards: "
        + ", ".join(f"{tier} {value:+.1f}" for tier, value in NAIVE_REWARDS.items())
    )
    for estimator in args.estimators:
        print(f"\n{estimator} (turn_norm={args.turn_norm})")
        print(
            f"  {'tier':<8} {'turns':>7} {'r_pb':>7} {'reward':>7} {'mean adv':>9}"
            f" {'misaligned':>11}"
        )
        total = 0
        for row in tier_report(rollouts, estimator, NAIVE_REWARDS, turn_norm=args.turn_norm):
            total += row.misaligned
            print(
                f"  {row.tier:<8} {row.turns:>7} {row.r_pb:>+7.3f} {row.reward:>+7.1f}"
                f" {row.mean_advantage:>+9.3f} {row.misaligned:>11}"
            )
        print(f"  misaligned turns: {total}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``turnrl`` command."""
    parser = argparse.ArgumentParser(
        prog="turnrl",
        description="Multi-turn RL for tool-calling agents: advantages, calibration, training.",
    )
    parser.add_argument("--version", action="version", version=f"turnrl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the advantage estimators on embedded synthetic rollouts (no data needed)",
        description="Synthetic rollouts with planted reward tiers: per estimator and tier, the "
        "correlation of the tier with success and the turns whose advantage has the wrong sign.",
    )
    demo.add_argument("--tasks", type=int, default=256)
    demo.add_argument("--group-size", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--estimators",
        nargs="+",
        default=["grpo", "mt_grpo", "gtpo_hybrid"],
        choices=estimator_names(),
    )
    demo.add_argument("--turn-norm", default="position", choices=["position", "pooled"])
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``turnrl`` command."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
