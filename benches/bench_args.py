"""Benchmark: turnrl.compare_args against a plain recursive Python comparison
with the same rules (tests/args_reference.py), measured in the same run.

Workloads, built from tau-bench's airline data (read with ast / json, never
executed) and seeded random perturbations (reordered keys, numeric strings,
padding, case, empty extras, one changed leaf, a missing key):

* ``gold-args``: every airline test task's gold action arguments (2 to 27
  leaves each) against a perturbed copy;
* ``reservations``: whole reservation records (about 30 leaves, lists of
  dicts) against a perturbed copy.

Run:  python benches/bench_args.py [--tau-bench ../shared/tau-bench] [--pairs 4000]
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# numpy (imported by turnrl) would otherwise start OpenBLAS threads that spin
# and steal cycles from both sides of the comparison.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import turnrl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import args_reference as ref


def gold_arguments(tau_bench: Path) -> list[dict[str, Any]]:
    source = (tau_bench / "tau_bench/envs/airline/tasks_test.py").read_text()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Action":
            kwargs = next(k.value for k in node.keywords if k.arg == "kwargs")
            out.append(ast.literal_eval(kwargs))
    return [a for a in out if a]


def reservations(tau_bench: Path, n: int) -> list[dict[str, Any]]:
    path = tau_bench / "tau_bench/envs/airline/data/reservations.json"
    data = json.loads(path.read_text())
    return list(data.values())[:n]


def perturb(value: Any, rng: random.Random) -> Any:
    """Same meaning, different surface: key order, numbers as strings, padding."""
    if isinstance(value, dict):
        keys = list(value)
        rng.shuffle(keys)
        return {k: perturb(value[k], rng) for k in keys}
    if isinstance(value, list):
        return [perturb(x, rng) for x in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return rng.choice([value, str(value), float(value)])
    if isinstance(value, str):
        return rng.choice([value, f" {value} ", value])
    return value


def leaf_paths(value: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in leaf_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in leaf_paths(v, (*path, i))]
    return [path]


def make_pred(gold: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    pred = perturb(copy.deepcopy(gold), rng)
    roll = rng.random()
    if roll < 0.3:
        # Change one leaf.
        path = rng.choice(leaf_paths(pred))
        node = pred
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = "changed"
    elif roll < 0.4:
        pred.pop(rng.choice(list(pred)))
    elif roll < 0.5:
        pred["note"] = rng.choice([None, "", [], {}])
    return pred


def best_times(
    fns: list[Callable[[], object]], repeats: int, clock: Callable[[], float]
) -> list[float]:
    """Best time of each function; the functions take turns in every round
    so that all of them see the same background load."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = clock()
            fn()
            best[i] = min(best[i], clock() - start)
    return best


def run(
    name: str, pairs: list[tuple[dict, dict]], repeats: int, clock: Callable[[], float]
) -> list[tuple[str, str, float]]:
    # The two implementations agree on every pair before anything is timed.
    for pred, gold in pairs:
        got = turnrl.compare_args(pred, gold)
        want = ref.compare(pred, gold)
        assert (got.kind, got.diffs) == (want["kind"], want["diffs"]), (pred, gold)

    def python_loop() -> None:
        for pred, gold in pairs:
            ref.compare(pred, gold)

    def turnrl_loop() -> None:
        for pred, gold in pairs:
            turnrl.compare_args(pred, gold)

    def turnrl_batch() -> None:
        turnrl.compare_args_batch(pairs)

    impls = [
        ("python reference (loop)", python_loop),
        ("turnrl.compare_args (loop)", turnrl_loop),
        ("turnrl.compare_args_batch", turnrl_batch),
    ]
    times = best_times([fn for _, fn in impls], repeats, clock)
    return [(name, label, t / len(pairs)) for (label, _), t in zip(impls, times, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_tau = Path(__file__).resolve().parents[1] / ".." / "shared" / "tau-bench"
    parser.add_argument("--tau-bench", type=Path, default=default_tau)
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this process's CPU time (steady on a shared machine); wall: perf_counter",
    )
    args = parser.parse_args()

    rng = random.Random(0)
    golds = gold_arguments(args.tau_bench)
    gold_pairs = [(make_pred(g, rng), g) for g in (golds * (args.pairs // len(golds) + 1))]
    gold_pairs = gold_pairs[: args.pairs]
    records = reservations(args.tau_bench, args.pairs)
    record_pairs = [(make_pred(r, rng), r) for r in records]

    leaves = sum(len(leaf_paths(g)) for _, g in gold_pairs) / len(gold_pairs)
    rleaves = sum(len(leaf_paths(g)) for _, g in record_pairs) / len(record_pairs)
    print(f"turnrl {turnrl.__version__}, Python {sys.version.split()[0]}")
    print(f"gold-args: {len(gold_pairs)} pairs, {leaves:.1f} gold leaves on average")
    print(f"reservations: {len(record_pairs)} pairs, {rleaves:.1f} gold leaves on average")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"clock: {args.clock}, best of {args.repeats} rounds")
    rows = run("gold-args", gold_pairs, args.repeats, clock)
    rows += run("reservations", record_pairs, args.repeats, clock)

    print()
    print(f"| {'workload':<13}| {'implementation':<46}| {'us/pair':>8} | {'speed-up':>8} |")
    print(f"|{'-' * 14}|{'-' * 47}|{'-' * 10}|{'-' * 10}|")
    baseline: dict[str, float] = {}
    for workload, label, seconds in rows:
        baseline.setdefault(workload, seconds)
        ratio = baseline[workload] / seconds
        print(f"| {workload:<13}| {label:<46}| {seconds * 1e6:8.2f} | {ratio:7.1f}x |")


if __name__ == "__main__":
    main()
