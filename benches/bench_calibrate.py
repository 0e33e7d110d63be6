"""Offline IRC over a large rollout buffer: turnrl vs a Python pipeline.

    python benches/bench_calibrate.py [--megabytes 1024] [--workers 2] [--dir /tmp/x]
                                      [--line-writes]

Generates a turnrl.rollout/1 buffer with planted tiers, written by
turnrl.RolloutWriter as a training run writes one (kept in --dir, reused
when present; ``--line-writes`` writes the same bytes one write() per line,
which the page cache keeps in small pages), then times the same job both
ways: read every line, per-tier sums, point-biserial correlations, rewards
from them, and one direction check of the GTPO hybrid with those rewards.

- turnrl: ``turnrl.irc.load_buffers`` (Rust reader, ``--workers`` threads),
  ``TierStats`` in Rust, ``compute_advantages`` in Rust;
- Python: orjson per line into lists, numpy for the sums, scipy's
  pointbiserialr per tier, the vectorised numpy GTPO hybrid
  (benches/advantage_baselines.py).

Both must agree on every correlation before any time is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import orjson
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).parent))
from advantage_baselines import numpy_gtpo_hybrid

from turnrl import RolloutWriter
from turnrl.calibration import DEFAULT_TIERS, direction_check, rewards_from_correlations
from turnrl.irc import load_buffers

TOOLS = [
    "get_user_details",
    "get_reservation_details",
    "search_direct_flight",
    "update_reservation_flights",
    "cancel_reservation",
    "send_certificate",
]
TIER_CODE = {name: code for code, name in enumerate(DEFAULT_TIERS)}


def generate(path: Path, megabytes: int, seed: int = 0, line_writes: bool = False) -> None:
    """Write about ``megabytes`` MB: groups of 8, 2-16 assistant turns, tool
    results of 0.2-3 KB, gold predictive of success, error of failure.

    The buffer is written by ``turnrl.RolloutWriter``, as a training run
    writes one. With ``line_writes`` it is written one ``write()`` per line
    instead: the same bytes, but the page cache then keeps the file in small
    pages, which makes copying it back out of the cache about twice as slow
    for any reader (see benches/RESULTS.md).
    """
    rng = random.Random(seed)
    # Tool results are JSON text (as tau-bench's tools return), so inside a
    # rollout line they are strings full of escaped quotes.
    filler = orjson.dumps(
        [
            {
                "reservation_id": f"R{k:05d}",
                "user_id": f"user_{k}",
                "origin": "JFK",
                "destination": "SEA",
                "flight_type": "one_way",
                "cabin": "economy",
                "flights": [
                    {
                        "flight_number": f"HAT{k % 300:03d}",
                        "date": "2024-05-20",
                        "price": 100 + k % 50,
                    }
                ],
                "passengers": [{"first_name": "Mia", "last_name": "Li", "dob": "1990-04-05"}],
            }
            for k in range(40)
        ]
    ).decode()
    target = megabytes * 1_000_000
    written = 0
    index = 0
    tmp = path.with_suffix(".tmp")
    writer = None if line_writes else RolloutWriter(path, compress=None)
    with tmp.open("wb") if line_writes else contextlib.nullcontext() as fh:
        while written < target:
            task = index // 8
            success = rng.random() < 0.45
            turns = []
            for _ in range(rng.randint(2, 16)):
                roll = rng.random()
                if roll < (0.25 if success else 0.08):
                    tier = "gold"
                elif roll < 0.35:
                    tier = "error" if (not success and rng.random() < 0.6) else "read"
                else:
                    tier = rng.choice(["read", "read", "write", "soft", "respond"])
                call = {
                    "name": rng.choice(TOOLS),
                    "arguments": {"user_id": f"user_{task}", "reservation_id": f"R{index}"},
                }
                turns.append(
                    {
                        "role": "assistant",
                        "content": filler[: rng.randint(20, 300)],
                        "tool_calls": [call],
                        "tier": tier,
                        "reward": 0.0,
                    }
                )
                start = rng.randint(0, 1000)
                turns.append(
                    {
                        "role": "tool",
                        "name": call["name"],
                        "content": filler[start : start + rng.randint(200, 3000)],
                    }
                )
            record = {
                "schema": "turnrl.rollout/1",
                "task_id": f"airline/test/{task}",
                "group": f"step-0/airline/test/{task}",
                "sample": index % 8,
                "outcome": 1.0 if success else 0.0,
                "turns": turns,
                "meta": {},
            }
            line = orjson.dumps(record) + b"\n"
            if fh is not None:
                fh.write(line)
            else:
                writer.write(record)
            written += len(line)
            index += 1
    if writer is not None:
        writer.close()
    else:
        tmp.rename(path)


def turnrl_pipeline(path: Path, workers: int):
    rollouts, stats, _ = load_buffers([str(path)], workers=workers)
    correlations = stats.correlations()
    rewards = rewards_from_correlations(correlations)
    directions = direction_check(rollouts, rewards, correlations)
    return correlations, directions


def python_pipeline(path: Path):
    outcome, group, tiers, offsets = [], [], [], [0]
    group_ids: dict[str, int] = {}
    with path.open("rb") as fh:
        for line in fh:
            record = orjson.loads(line)
            outcome.append(float(record["outcome"]))
            group.append(group_ids.setdefault(record["group"], len(group_ids)))
            for turn in record["turns"]:
                if turn["role"] == "assistant":
                    tiers.append(TIER_CODE.get(turn.get("tier"), -1))
            offsets.append(len(tiers))
    outcome_a = np.array(outcome)
    group_a = np.array(group, dtype=np.int64)
    tiers_a = np.array(tiers, dtype=np.int64)
    offsets_a = np.array(offsets, dtype=np.int64)
    b, t = len(outcome_a), len(DEFAULT_TIERS)
    traj = np.repeat(np.arange(b), np.diff(offsets_a))
    labelled = tiers_a >= 0
    counts = np.bincount(traj[labelled] * t + tiers_a[labelled], minlength=b * t).reshape(b, t)
    success = outcome_a >= 1.0
    r = np.array([scipy_stats.pointbiserialr(counts[:, k] > 0, success) for k in range(t)])
    keep = (r[:, 1] < 0.05) & (np.abs(r[:, 0]) >= 0.1)
    rewards = np.where(keep, r[:, 0] / np.abs(r[keep, 0]).max(), 0.0)
    adv = numpy_gtpo_hybrid(outcome_a, group_a, rewards[tiers_a], offsets_a)
    misaligned = np.bincount(tiers_a, np.sign(rewards[tiers_a]) * adv < 0, minlength=t)
    return r, misaligned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--dir", default="/tmp/turnrl-bench")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--line-writes",
        action="store_true",
        help="write the buffer one write() per line instead of with turnrl.RolloutWriter",
    )
    args = parser.parse_args()

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    layout = "-line-writes" if args.line_writes else ""
    path = folder / f"irc-{args.megabytes}mb-v3{layout}.jsonl"
    if not path.exists():
        start = time.perf_counter()
        generate(path, args.megabytes, line_writes=args.line_writes)
        print(f"generated {path} in {time.perf_counter() - start:.1f} s")
    size_mb = path.stat().st_size / 1e6

    # Warm the page cache so both read from memory.
    with path.open("rb") as fh:
        while fh.read(1 << 24):
            pass
    correlations, directions = turnrl_pipeline(path, args.workers)
    r_py, misaligned_py = python_pipeline(path)
    np.testing.assert_allclose([c.r for c in correlations], r_py[:, 0], atol=1e-9)
    assert [d.misaligned for d in directions] == misaligned_py.tolist()

    def best(fn) -> float:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    t_turnrl = best(lambda: turnrl_pipeline(path, args.workers))
    t_one = best(lambda: turnrl_pipeline(path, 1))
    t_python = best(lambda: python_pipeline(path))
    how = "one write() per line" if args.line_writes else "written by turnrl.RolloutWriter"
    print(f"buffer {size_mb:.0f} MB ({how}), {os.cpu_count()} cores")
    print(f"{'pipeline':<28} {'seconds':>8} {'MB/s':>8} {'x python':>9}")
    for name, t in (
        (f"turnrl ({args.workers} workers)", t_turnrl),
        ("turnrl (1 worker)", t_one),
        ("python (orjson+numpy+scipy)", t_python),
    ):
        print(f"{name:<28} {t:>8.2f} {size_mb / t:>8.0f} {t_python / t:>9.1f}")


if __name__ == "__main__":
    main()
