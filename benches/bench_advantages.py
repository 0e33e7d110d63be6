"""Advantage estimators: turnrl (Rust) vs vectorised numpy vs a verl-style loop.

    python benches/bench_advantages.py [--sizes 1000 64000 1000000] [--repeat 5] [--norm std]

Prints, per size, the best-of-N wall time of each implementation, the speedup
ratios of turnrl over the baselines measured in the same run, and nanoseconds
per turn (constant across sizes when time is linear in the number of turns).
Results are checked against each other before anything is timed. The
baselines normalise as ``norm="std"`` does; under another ``--norm`` only
turnrl is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from advantage_baselines import loop_gtpo_hybrid, make_batch, numpy_gtpo_hybrid

import turnrl


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_size(size: int, repeat: int, loop_max: int, norm: str = "std") -> None:
    """Time every implementation on one generated batch and print its rows."""
    outcome, group, rewards, offsets = make_batch(size)
    n_turns = len(rewards)

    def rust(estimator: str = "gtpo_hybrid"):
        return turnrl.compute_advantages(estimator, outcome, group, rewards, offsets, norm=norm)

    def vectorised():
        return numpy_gtpo_hybrid(outcome, group, rewards, offsets)

    def loop():
        return loop_gtpo_hybrid(outcome, group, rewards, offsets)

    # Small batches get more rounds (up to 300): a best of 15 sub-millisecond
    # calls still caught the thread pool waking up.
    rounds = max(repeat, min(300, 10_000_000 // max(n_turns, 1)))
    if norm != "std":  # the baselines normalise as std does
        for estimator in ("gtpo_hybrid", "grpo", "mt_grpo"):
            t_est = best_time(lambda estimator=estimator: rust(estimator), rounds)
            print(
                f"{n_turns:>9} {estimator:>12} {t_est * 1e3:>10.3f} {'-':>10} {'-':>10}"
                f" {'-':>8} {'-':>8} {t_est / n_turns * 1e9:>8.2f}"
            )
        return
    want = rust()
    np.testing.assert_allclose(vectorised(), want, atol=1e-6)
    t_rust = best_time(rust, rounds)
    t_numpy = best_time(vectorised, rounds)
    if n_turns <= loop_max:
        np.testing.assert_allclose(loop(), want, atol=1e-9)
        t_loop = best_time(loop, max(1, repeat // 3))
        loop_cols, ratio_loop = f"{t_loop * 1e3:>10.2f}", f"{t_loop / t_rust:>8.0f}"
    else:
        loop_cols, ratio_loop = f"{'-':>10}", f"{'-':>8}"
    print(
        f"{n_turns:>9} {'gtpo_hybrid':>12} {t_rust * 1e3:>10.3f} {t_numpy * 1e3:>10.2f}"
        f" {loop_cols} {t_numpy / t_rust:>8.1f} {ratio_loop} {t_rust / n_turns * 1e9:>8.2f}"
    )
    for estimator in ("grpo", "mt_grpo"):
        t_est = best_time(lambda estimator=estimator: rust(estimator), rounds)
        print(
            f"{n_turns:>9} {estimator:>12} {t_est * 1e3:>10.3f} {'-':>10} {'-':>10}"
            f" {'-':>8} {'-':>8} {t_est / n_turns * 1e9:>8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 64_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--loop-max", type=int, default=1_000_000, help="skip the Python loop above this many turns"
    )
    parser.add_argument(
        "--norm",
        default="std",
        choices=["std", "mean", "none", "rloo", "batch"],
        help="the estimators' norm (default: %(default)s; the baselines only under std)",
    )
    args = parser.parse_args()
    print(
        f"cores: {os.cpu_count()}, numpy {np.__version__}, turnrl {turnrl.__version__}, "
        f"norm {args.norm}"
    )
    print(
        f"{'turns':>9} {'estimator':>12} {'turnrl ms':>10} {'numpy ms':>10} {'loop ms':>10}"
        f" {'x numpy':>8} {'x loop':>8} {'ns/turn':>8}"
    )
    for size in args.sizes:
        bench_size(size, args.repeat, args.loop_max, args.norm)


if __name__ == "__main__":
    main()
