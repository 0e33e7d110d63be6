"""Episode reset + reward: turnrl's copy-on-write episodes vs tau-bench's way.

tau-bench re-reads the JSON database on every reset, and its reward hashes
the whole database, re-reads the JSON again, replays the gold actions and
hashes again. The baseline below does exactly that (our own code, same
work). turnrl keeps the parsed tables, gives each episode an empty overlay
and compares only touched records against a cached gold replay.

Each episode: reset, run the task's gold actions, compute the reward.

    python benches/bench_envs.py [--root ../shared/tau-bench] [--episodes 50]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from hashlib import sha256
from pathlib import Path

from turnrl import envs

TABLES = {
    "airline": ("flights", "reservations", "users"),
    "retail": ("orders", "products", "users"),
}


def _hashable(x):
    if isinstance(x, dict):
        return tuple((k, _hashable(v)) for k, v in sorted(x.items()))
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    return x


def _digest(data) -> str:
    return sha256(str(_hashable(data)).encode()).hexdigest()


def baseline_episode(data_dir: Path, tables, domain, task) -> float:
    """tau-bench's reset + reward, with turnrl's tools applied to plain dicts."""

    def load():
        out = {}
        for n in tables:
            with open(data_dir / f"{n}.json") as f:
                out[n] = json.load(f)
        return out

    def run(data, actions):
        store = envs._db.Store(data)
        for a in actions:
            domain._invoke(store, a.name, copy.deepcopy(dict(a.kwargs)))
        # apply the overlay in place, as tau-bench's tools mutate ``data``
        for t, recs in store.overlay.items():
            data[t].update(recs)

    data = load()  # reset
    run(data, task.actions)  # the agent's actions (here: gold)
    got = _digest(data)
    gold = load()  # reward: fresh data, replay gold, hash
    run(gold, [a for a in task.actions if a.name not in domain.terminate_tools])
    return float(got == _digest(gold))


def turnrl_episode(domain, task) -> float:
    ep = domain.new_episode(task)
    for a in task.actions:
        ep.call(a.name, a.kwargs)
    return float(bool(ep.reward().db_match))


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", type=Path, default=here.parent / "shared" / "tau-bench")
    p.add_argument("--episodes", type=int, default=50)
    args = p.parse_args()
    for name, dom in (("taubench:airline", "airline"), ("taubench:retail", "retail")):
        domain = envs.load(name, root=args.root, split="test")
        tasks = domain.tasks[: args.episodes]
        data_dir = args.root / "tau_bench" / "envs" / dom / "data"

        t0 = time.perf_counter()
        base = [baseline_episode(data_dir, TABLES[dom], domain, t) for t in tasks]
        t_base = (time.perf_counter() - t0) / len(tasks)

        domain._gold.clear()
        t0 = time.perf_counter()
        cold = [turnrl_episode(domain, t) for t in tasks]
        t_cold = (time.perf_counter() - t0) / len(tasks)

        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            warm = [turnrl_episode(domain, t) for t in tasks]
        t_warm = (time.perf_counter() - t0) / (reps * len(tasks))

        assert base == cold == warm, "baseline and turnrl disagree on rewards"
        print(
            f"{name}: {len(tasks)} tasks | tau-bench way {t_base * 1e3:8.2f} ms/episode | "
            f"turnrl first visit {t_cold * 1e3:6.3f} ms ({t_base / t_cold:7.0f}x) | "
            f"turnrl repeat {t_warm * 1e3:6.3f} ms ({t_base / t_warm:7.0f}x)"
        )


if __name__ == "__main__":
    main()
