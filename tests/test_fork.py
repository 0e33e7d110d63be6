"""The Rust core keeps working in a forked child after the parent used its
thread pool (DataLoader and multiprocessing workers fork)."""

from __future__ import annotations

import multiprocessing
import sys

import numpy as np
import pytest

import turnrl


def big_batch():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 41, size=4000)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    group = np.arange(4000) // 8
    outcome = rng.integers(0, 2, size=4000).astype(float)
    rewards = rng.choice([0.0, 0.3, 1.0], size=offsets[-1])
    return outcome, group, rewards, offsets


def work_in_child(queue) -> None:
    adv = turnrl.compute_advantages("gtpo_hybrid", *big_batch())
    parsed = turnrl.parse_tool_calls_batch(['<tool_call>{"name": "f"}</tool_call>'] * 2000)
    queue.put((float(adv.sum()), len(parsed)))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_core_runs_in_a_forked_child():
    # Warm the parent's pool with parallel work (above the parallel threshold).
    want = float(turnrl.compute_advantages("gtpo_hybrid", *big_batch()).sum())
    turnrl.parse_tool_calls_batch(['<tool_call>{"name": "f"}</tool_call>'] * 2000)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=work_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the Rust core")
    assert child.exitcode == 0
    got_sum, parsed = queue.get(timeout=5)
    assert got_sum == pytest.approx(want) and parsed == 2000
