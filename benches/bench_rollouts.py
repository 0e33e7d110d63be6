"""Benchmark: reading a rollout buffer into columns.

    python benches/bench_rollouts.py [--mb 200] [--repeat 3]

Generates a realistic ``turnrl.rollout/1`` buffer in a temporary folder (2 to
30 assistant turns per trajectory, each with a tool call followed by a tool
result of 0.5 to 6 KB of JSON text; groups of 8), plain and zstd, then times
``turnrl.read_rollouts`` on one worker and on every core against a Python
loop with orjson that builds the same numpy columns (the baseline, measured
in the same run). Prints a table with MB/s (of decoded JSONL) and ratios;
for zstd also the time of decompression alone (python-zstandard), the floor
that every zstd reader pays.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import zstandard

import turnrl

SCHEMA = "turnrl.rollout/1"
TOOLS = [
    ("get_user_details", "read"),
    ("get_reservation_details", "read"),
    ("search_direct_flight", "read"),
    ("update_reservation_flights", "write"),
    ("cancel_reservation", "write"),
]


def tool_result(rng: random.Random) -> str:
    """A tool result as tau-bench returns it: JSON text, a few KB."""
    flights = [
        {
            "flight_number": f"HAT{rng.randint(1, 300):03d}",
            "origin": rng.choice(["JFK", "SFO", "ORD", "LAX", "SEA"]),
            "destination": rng.choice(["ATL", "DEN", "BOS", "PHX", "MIA"]),
            "date": f"2024-05-{rng.randint(1, 30):02d}",
            "price": rng.randint(50, 2000),
            "status": rng.choice(["available", "delayed", "on time"]),
            "seats": {"basic_economy": rng.randint(0, 20), "economy": rng.randint(0, 20)},
        }
        for _ in range(rng.randint(3, 40))
    ]
    return json.dumps({"reservation_id": "ZFA04Y", "flights": flights, "note": "élan ✈"})


STOP_REASONS = ("user_stop", "user_stop", "max_steps", "transfer")


def make_record(rng: random.Random, index: int, results: list[str]) -> dict:
    turns: list[dict] = [{"role": "user", "content": "Hi! I need to change my flight, please."}]
    for _ in range(rng.randint(2, 30)):
        name, kind = rng.choice(TOOLS)
        tier = rng.choice(["gold", kind, kind, "error", "soft"])
        turns.append(
            {
                "role": "assistant",
                "content": "Let me look that up for you." if rng.random() < 0.5 else "",
                "tool_calls": [
                    {"name": name, "arguments": {"reservation_id": "ZFA04Y", "user_id": "mia_3668"}}
                ],
                "tier": tier,
                "reward": {"gold": 1.0, "read": 0.0, "write": -0.1, "error": -0.5}.get(tier, 0.3),
            }
        )
        turns.append({"role": "tool", "name": name, "content": rng.choice(results)})
    turns.append({"role": "assistant", "content": "Done!", "tier": "respond", "reward": 0.0})
    task = index // 8
    return {
        "schema": SCHEMA,
        "task_id": f"airline/train/{task % 500}",
        "group": f"step-{task // 500}/airline/train/{task % 500}",
        "sample": index % 8,
        "outcome": float(rng.random() < 0.5),
        "turns": turns,
        # A stop reason, as run_episode writes: the reader returns it as a column.
        "meta": {"model": "qwen3-4b", "seed": index, "stop_reason": STOP_REASONS[index % 4]},
    }


def generate(folder: Path, megabytes: int) -> tuple[Path, Path]:
    rng = random.Random(0)
    results = [tool_result(rng) for _ in range(4096)]
    plain, packed = folder / "rollouts.jsonl", folder / "rollouts.jsonl.zst"
    target = megabytes << 20
    with turnrl.RolloutWriter(plain, None) as wp, turnrl.RolloutWriter(packed, "zstd") as wz:
        size, index = 0, 0
        while size < target:
            record = make_record(rng, index, results)
            wp.write(record)
            wz.write(record)
            size += len(json.dumps(record, ensure_ascii=False).encode()) + 1
            index += 1
    return plain, packed


def orjson_columns(lines) -> dict:
    """The baseline: what a Python user writes to get the same columns."""
    group_codes: dict[str, int] = {}
    tier_codes = {t: i for i, t in enumerate(("gold", "soft", "read", "write", "error", "respond"))}
    stop_codes: dict[str, int] = {}
    outcome, sample, group_index, offsets, rewards, tiers = [], [], [], [0], [], []
    stop_reason = []
    skipped = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
            if rec["schema"] != SCHEMA:
                raise ValueError(f"line {number}: schema")
            group = rec["group"]
            out = float(rec["outcome"])
            smp = int(rec["sample"])
            turns = rec["turns"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            skipped += 1
            continue
        outcome.append(out)
        sample.append(smp)
        group_index.append(group_codes.setdefault(group, len(group_codes)))
        meta = rec.get("meta")
        reason = meta.get("stop_reason") if isinstance(meta, dict) else None
        stop_reason.append(
            stop_codes.setdefault(reason, len(stop_codes)) if isinstance(reason, str) else -1
        )
        for turn in turns:
            if turn["role"] == "assistant":
                rewards.append(float(turn.get("reward") or 0.0))
                tier = turn.get("tier")
                tiers.append(-1 if tier is None else tier_codes.setdefault(tier, len(tier_codes)))
        offsets.append(len(rewards))
    return {
        "outcome": np.array(outcome, dtype=np.float64),
        "sample": np.array(sample, dtype=np.int64),
        "group_index": np.array(group_index, dtype=np.int64),
        "turn_offsets": np.array(offsets, dtype=np.int64),
        "turn_rewards": np.array(rewards, dtype=np.float64),
        "turn_tiers": np.array(tiers, dtype=np.int16),
        "stop_reason_index": np.array(stop_reason, dtype=np.int64),
        "skipped": skipped,
    }


def orjson_plain(path: Path) -> dict:
    # A 1 MB buffer, as for zstd: with the default one (a few KB) the same
    # loop is about 1.6x slower here, which would flatter turnrl.
    with open(path, "rb", buffering=1 << 20) as f:
        return orjson_columns(f)


def orjson_zstd(path: Path) -> dict:
    with open(path, "rb") as f:
        stream = zstandard.ZstdDecompressor().stream_reader(f)
        return orjson_columns(io.BufferedReader(stream, buffer_size=1 << 20))


def zstd_decompress_only(path: Path) -> int:
    """The floor for any zstd reader: decompressing alone, parsing nothing."""
    size = 0
    with open(path, "rb") as f:
        stream = zstandard.ZstdDecompressor().stream_reader(f)
        while chunk := stream.read(1 << 20):
            size += len(chunk)
    return size


def best_of(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the plain buffer in MB")
    parser.add_argument("--repeat", type=int, default=3, help="timings per case (best kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="turnrl-bench-") as tmp:
        t0 = time.perf_counter()
        plain, packed = generate(Path(tmp), args.mb)
        decoded = plain.stat().st_size
        print(
            f"buffer: {decoded / 1e6:.0f} MB plain, {packed.stat().st_size / 1e6:.0f} MB zstd "
            f"(generated in {time.perf_counter() - t0:.0f} s); cpus: {os.cpu_count()}; "
            f"load average: {os.getloadavg()[0]:.1f}"
        )
        rows = []
        for label, path, baseline in (
            ("plain", plain, orjson_plain),
            ("zstd", packed, orjson_zstd),
        ):
            t_base, ref = best_of(lambda p=path, f=baseline: f(p), args.repeat)
            t_one, one = best_of(lambda p=path: turnrl.read_rollouts(p, workers=1), args.repeat)
            t_all, _ = best_of(lambda p=path: turnrl.read_rollouts(p), args.repeat)
            # Same columns, or the comparison means nothing.
            assert isinstance(ref, dict) and isinstance(one, turnrl.RolloutBatch)
            np.testing.assert_array_equal(one.turn_offsets, ref["turn_offsets"])
            np.testing.assert_array_equal(one.turn_rewards, ref["turn_rewards"])
            np.testing.assert_array_equal(one.turn_tiers, ref["turn_tiers"])
            np.testing.assert_array_equal(one.group_index, ref["group_index"])
            np.testing.assert_array_equal(one.outcome, ref["outcome"])
            np.testing.assert_array_equal(one.stop_reason_index, ref["stop_reason_index"])
            rows.append((label, "orjson loop (1 core)", t_base, 1.0))
            rows.append((label, "read_rollouts workers=1", t_one, t_base / t_one))
            rows.append((label, "read_rollouts (all cores)", t_all, t_base / t_all))
            if label == "zstd":
                t_unzip, _ = best_of(lambda p=path: zstd_decompress_only(p), args.repeat)
                rows.append((label, "decompression alone", t_unzip, t_base / t_unzip))
        print(f"{one.num_trajectories} trajectories, {one.num_turns} assistant turns")
        print(f"{'file':6} {'reader':28} {'seconds':>8} {'MB/s':>8} {'vs orjson':>10}")
        for label, name, t, ratio in rows:
            print(f"{label:6} {name:28} {t:8.3f} {decoded / 1e6 / t:8.0f} {ratio:9.1f}x")


if __name__ == "__main__":
    main()
