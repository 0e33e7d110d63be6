"""Tool-call parsing: turnrl (Rust) against a Python parser written the way
vLLM's Hermes tool parser works (one compiled regex, then json.loads per match).

Run: python benches/bench_parsing.py [--messages N] [--repeats R] [--seed S]

Completions are generated: prose, a <think> block, and 0 to 3 Hermes calls
with nested arguments, 200 B to 8 KB each. Both parsers are timed in this run
on the same messages; the table prints µs per message and the speed-ups.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any

import turnrl

WORDS = (
    "the reservation flight passenger baggage policy refund cabin economy business "
    "basic user wants to change cancel book check status delayed insurance payment "
    "certificate gift card credit membership gold silver regular airport JFK LAX SFO "
    "ORD date 2024-05-15 I will first look up your details and then confirm with you "
    "before making any change , . ? according to the policy I cannot do that"
).split()
TOOLS = (
    "get_user_details",
    "get_reservation_details",
    "search_direct_flight",
    "update_reservation_flights",
    "book_reservation",
    "cancel_reservation",
)


def prose(rng: random.Random, n_bytes: int) -> str:
    out: list[str] = []
    size = 0
    while size < n_bytes:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def arguments(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(3)
    if kind == 0:
        return {"user_id": f"user_{rng.randrange(10**6)}"}
    if kind == 1:
        return {
            "origin": rng.choice(["JFK", "LAX", "SFO"]),
            "destination": rng.choice(["ORD", "SEA", "BOS"]),
            "date": f"2024-05-{rng.randrange(1, 29):02d}",
        }
    return {
        "user_id": f"user_{rng.randrange(10**6)}",
        "reservation_id": "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6)),
        "cabin": rng.choice(["economy", "business", "basic_economy"]),
        "flights": [
            {"flight_number": f"HAT{rng.randrange(1000):03d}", "date": "2024-05-17"}
            for _ in range(rng.randrange(1, 4))
        ],
        "passengers": [
            {"first_name": "Mei", "last_name": "Kim", "dob": "1980-01-0" + str(rng.randrange(1, 9))}
            for _ in range(rng.randrange(1, 3))
        ],
        "payment_id": f"credit_card_{rng.randrange(10**7)}",
        "total_baggages": rng.randrange(4),
        "nonfree_baggages": 0,
        "insurance": rng.choice(["yes", "no"]),
        "price": round(rng.uniform(50, 900), 2),
    }


def completion(rng: random.Random) -> str:
    target = int(math.exp(rng.uniform(math.log(200), math.log(8192))))
    n_calls = rng.choice([0, 1, 1, 2, 3])
    calls = [
        "<tool_call>\n"
        + json.dumps({"name": rng.choice(TOOLS), "arguments": arguments(rng)})
        + "\n</tool_call>"
        for _ in range(n_calls)
    ]
    fixed = sum(len(c) for c in calls)
    budget = max(40, target - fixed)
    think = "<think>\n" + prose(rng, budget * 2 // 3) + "\n</think>\n\n"
    parts = [think, prose(rng, budget // 3)]
    for c in calls:
        parts.append("\n" + c)
    return "".join(parts)


# The baseline, written the way vLLM's Hermes parser works: the Qwen3
# reasoning split (str.partition on </think>), one compiled DOTALL regex, then
# json.loads on every match; content is the text before the first call.
TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def vllm_style_parse(text: str) -> dict[str, Any]:
    reasoning = None
    if "</think>" in text:
        reasoning, _, text = text.partition("</think>")
        reasoning = reasoning.replace("<think>", "", 1).strip()
    if "<tool_call>" not in text:
        return {"content": text.strip(), "reasoning": reasoning, "tool_calls": []}
    try:
        calls = [json.loads(a if a else b) for a, b in TOOL_CALL_RE.findall(text)]
        tool_calls = [{"name": c["name"], "arguments": c.get("arguments", {})} for c in calls]
    except Exception:
        return {"content": text.strip(), "reasoning": reasoning, "tool_calls": []}
    content = text[: text.find("<tool_call>")].strip()
    return {"content": content, "reasoning": reasoning, "tool_calls": tool_calls}


def best_time(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    texts = [completion(rng) for _ in range(args.messages)]
    total_bytes = sum(len(t.encode()) for t in texts)
    n_calls = sum(t.count("<tool_call>") for t in texts)

    # Same answers first: a benchmark of two parsers that disagree means nothing.
    for t in texts:
        ours = turnrl.parse_tool_calls(t)
        ref = vllm_style_parse(t)
        assert ours.tool_calls == ref["tool_calls"], t
        assert ours.reasoning == ref["reasoning"], t
        assert not ours.errors

    parse = turnrl.parse_tool_calls

    def run_baseline() -> None:
        for t in texts:
            vllm_style_parse(t)

    # Every field the baseline returns is read, so both build the same
    # Python objects (ParsedMessage builds them on first access).
    def run_single() -> None:
        for t in texts:
            m = parse(t)
            m.content, m.reasoning, m.tool_calls, m.errors  # noqa: B018

    def run_single_lazy() -> None:
        for t in texts:
            parse(t)

    # The batch returns every message at once, so its objects all live
    # together; this loop keeps its results too, for a like-for-like row.
    def run_single_kept() -> None:
        kept = []
        for t in texts:
            m = parse(t)
            m.content, m.reasoning, m.tool_calls, m.errors  # noqa: B018
            kept.append(m)

    def run_batch() -> None:
        for m in turnrl.parse_tool_calls_batch(texts):
            m.content, m.reasoning, m.tool_calls, m.errors  # noqa: B018

    # Wall time (best of --repeats) and, for the single-threaded paths, the
    # CPU time of this thread, which a busy machine disturbs much less.
    runs = [
        ("python regex + json.loads (vLLM-style)", run_baseline, True),
        ("turnrl.parse_tool_calls, fields read", run_single, True),
        ("turnrl.parse_tool_calls, fields unread", run_single_lazy, True),
        ("turnrl.parse_tool_calls, read, all kept", run_single_kept, True),
        ("turnrl.parse_tool_calls_batch, read", run_batch, False),
    ]
    rows = []
    for label, fn, single_threaded in runs:
        wall = best_time(fn, args.repeats, time.perf_counter)
        cpu = best_time(fn, args.repeats, time.thread_time) if single_threaded else float("nan")
        rows.append((label, wall, cpu))

    n = len(texts)
    print(
        f"{n} messages, {total_bytes / n:.0f} B mean ({min(map(len, texts))}-"
        f"{max(map(len, texts))} B), {n_calls} calls, {os.cpu_count()} CPUs"
    )
    print(
        f"{'parser':<42} {'wall us/msg':>11} {'MB/s':>7} {'x wall':>7} "
        f"{'cpu us/msg':>10} {'x cpu':>6}"
    )
    base_wall, base_cpu = rows[0][1], rows[0][2]
    for label, wall, cpu in rows:
        cpu_cols = (
            f"{cpu / n * 1e6:>10.2f} {base_cpu / cpu:>5.1f}x"
            if cpu == cpu
            else f"{'-':>10} {'-':>6}"
        )
        print(
            f"{label:<42} {wall / n * 1e6:>11.2f} {total_bytes / wall / 1e6:>7.1f} "
            f"{base_wall / wall:>6.1f}x {cpu_cols}"
        )


if __name__ == "__main__":
    main()
