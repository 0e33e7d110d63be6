"""The ``turnrl`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from turnrl import __version__
from turnrl.advantages import estimator_names


def _print_correlations(correlations) -> None:
    print(
        f"  {'tier':<8} {'support':>8} {'succ with':>10} {'succ w/o':>9} {'r_pb':>7}"
        f" {'p':>9} {'95% CI':>16}"
    )
    for c in correlations:
        print(
            f"  {c.tier:<8} {c.support:>8} {c.success_with:>10.3f} {c.success_without:>9.3f}"
            f" {c.r:>+7.3f} {c.p_value:>9.2e} [{c.ci_low:>+6.3f}, {c.ci_high:>+6.3f}]"
        )


def _print_iteration(label: str, iteration) -> None:
    print(
        f"  {label}: misaligned turns {iteration.misaligned}"
        f" ({'aligned' if iteration.aligned else 'NOT aligned'})"
    )
    for d in iteration.directions:
        flag = "" if d.aligned else "  <- wrong sign"
        print(
            f"    {d.tier:<8} reward {d.reward:>+6.3f}  turns {d.turns:>6}"
            f"  mean adv {d.mean_advantage:>+7.3f}  misaligned {d.misaligned:>5}{flag}"
        )


def _demo(args: argparse.Namespace) -> int:
    from turnrl.calibration import calibrate
    from turnrl.demo import generate

    rollouts = generate(tasks=args.tasks, group_size=args.group_size, seed=args.seed)
    print(
        f"{len(rollouts.outcome)} synthetic rollouts ({args.tasks} tasks x "
        f"{args.group_size}), {rollouts.num_turns} assistant turns, success rate "
        f"{rollouts.outcome.mean():.2f}\n"
    )
    for estimator in args.estimators:
        report = calibrate(rollouts, "naive", estimator=estimator, turn_norm=args.turn_norm)
        if estimator == args.estimators[0]:
            print("Tier presence vs task success (point-biserial):")
            _print_correlations(report.correlations)
        print(f"\n{estimator} (turn_norm={args.turn_norm})")
        _print_iteration("naive dense rewards", report.initial)
        for it in report.iterations:
            rewards = " ".join(f"{tier}={value:+.2f}" for tier, value in it.rewards.items())
            print(f"  round {it.index}: misaligned {it.misaligned:>6}  {rewards}")
        _print_iteration(f"calibrated (round {report.best.index})", report.best)
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
        help="calibrate tier rewards on embedded synthetic rollouts (no data needed)",
        description="Synthetic rollouts with planted reward tiers: each tier's correlation with "
        "success, then, per estimator, the turns whose advantage has the wrong sign under the "
        "naive dense rewards and under the calibrated ones.",
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
